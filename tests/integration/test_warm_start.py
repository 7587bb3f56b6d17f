"""Warm start (issue 16): train.init_from starts a new run from exported weights with a fresh
optimizer at step 0; strict by default (a mismatch is listed before anything trains),
train.init_strict=false loads what matches (a new number of classes); a run that has
checkpoints of its own resumes from them and says it ignores train.init_from."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from capsdist.config import load_config
from capsdist.train import run_training
from capsdist.train.warm_start import WarmStartError
from data_tools.synthetic import make_synthetic_shards
from tests.conftest import small_run

pytestmark = pytest.mark.slow

# A learning rate so small that one step moves no weight by more than ~1e-12 (Adam's step is
# about lr whatever the gradient): the weights after it show where the run started.
STILL = ["train.lr=1e-12", "train.lr_min=0"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 10-class data set, a 5-class one, and a finished 10-class run trained on the first."""
    root = tmp_path_factory.mktemp("warm")
    make_synthetic_shards(root / "ten", n_train=64, n_test=16, samples_per_shard=32)
    make_synthetic_shards(root / "five", n_train=64, n_test=16, samples_per_shard=32, num_classes=5)
    run_training(config(root / "ten", root / "source", "train.max_steps=2"))
    return root


def config(data, run, *more: str):
    return load_config(["configs/debug_cpu.yaml"], small_run(data, run, *more))


def test_strict_warm_start_begins_at_step_0_from_the_weights(source, tmp_path, capsys):
    run = tmp_path / "run"
    warm = [*STILL, f"train.init_from={source / 'source'}"]
    run_training(config(source / "ten", run, "train.max_steps=1", *warm))
    assert f"warm start from {source / 'source' / 'model.safetensors'}" in capsys.readouterr().out
    start = load_file(source / "source" / "model.safetensors")
    after = load_file(run / "model.safetensors")
    assert after.keys() == start.keys()
    assert all(torch.allclose(after[k], v, atol=1e-9, rtol=0) for k, v in start.items())
    assert any(not torch.equal(after[k], v) for k, v in start.items())  # it did train a step
    with safe_open(str(run / "checkpoints/step000000001/optimizer.safetensors"), "pt") as f:
        assert f.metadata()["adam_step"] == "1"  # a fresh optimizer
    assert json.loads((run / "train.json").read_text())["step"] == 1
    # Rerun to more steps: the run's own checkpoint wins, and the log says init_from is ignored.
    run_training(config(source / "ten", run, "train.max_steps=2", *warm))
    out = capsys.readouterr().out
    assert "resumed from" in out and "train.init_from" in out and "ignored" in out


def test_strict_mismatch_lists_what_differs_before_training(source, tmp_path):
    run = tmp_path / "run"
    five = ["model.num_classes=5", f"train.init_from={source / 'source' / 'model.safetensors'}"]
    with pytest.raises(WarmStartError) as caught:
        run_training(config(source / "five", run, "train.max_steps=1", *five))
    message = str(caught.value)
    assert "model.num_classes: 10 there, 5 here" in message
    assert "other shape:" in message and "train.init_strict=false" in message
    assert not (run / "checkpoints").exists()


def test_non_strict_loads_what_matches_and_lists_the_rest(source, tmp_path, capsys):
    run = tmp_path / "run"
    init = f"train.init_from={source / 'source'}"
    five = ["model.num_classes=5", init, "train.init_strict=false", *STILL]
    run_training(config(source / "five", run, "train.max_steps=1", *five))
    note = next(line for line in capsys.readouterr().out.splitlines() if "warm start" in line)
    start = load_file(source / "source" / "model.safetensors")
    after = load_file(run / "model.safetensors")
    kept = [k for k in after if after[k].shape == start[k].shape]
    skipped = [k for k in after if after[k].shape != start[k].shape]
    assert (
        kept and skipped
    )  # the convolutions fit; the class capsules and the decoder's input do not
    assert all(torch.allclose(after[k], start[k], atol=1e-9, rtol=0) for k in kept)
    assert f"{len(kept)} of {len(after)} tensors loaded" in note
    assert all(name in note for name in skipped[:6]) and "other shape:" in note
