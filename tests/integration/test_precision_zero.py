"""Every ds.precision × ds.zero_stage trains, checkpoints, exports fp32 weights, evaluates and
resumes (issue 15): bf16 with ZeRO-0 once died at its first checkpoint. fp16 needs a GPU
(DeepSpeed's CPU accelerator has none) and is refused up front on CPU. One process per cell,
in-process (the API the sweeps use); the 2-rank cells are in test_topology_resume.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from capsdist.config import ConfigError, load_config
from capsdist.eval import run_eval
from capsdist.train import run_training
from data_tools.synthetic import make_synthetic_shards
from tests.conftest import small_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_shards(out, n_train=128, n_test=32, samples_per_shard=32)
    return out


def config(data, run, *overrides: str):
    overrides = small_run(data, run, "train.checkpoint_every=1", *overrides)
    return load_config(["configs/debug_cpu.yaml"], overrides)


def adam_step(folder) -> int:
    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        return int(f.metadata()["adam_step"])


def is_bf16_exact(t: torch.Tensor) -> bool:
    return torch.equal(t, t.to(torch.bfloat16).float())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_precision_x_zero_trains_exports_evaluates_and_resumes(data, tmp_path, precision, zero):
    run = tmp_path / "run"
    ds = [f"ds.precision={precision}", f"ds.zero_stage={zero}"]
    first = run_training(config(data, run, "train.max_steps=2", *ds))
    assert (
        first["step"] == 2 and json.loads((run / "status.json").read_text())["state"] == "finished"
    )

    # The exported weights are the fp32 masters, not the bf16 copies the model computes with.
    exported = load_file(run / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in exported.values())
    step2 = run / "checkpoints" / "step000000002"
    assert all(
        torch.equal(exported[k], v) for k, v in load_file(step2 / "model.safetensors").items()
    )
    big = [t for t in exported.values() if t.numel() > 100]
    assert not all(is_bf16_exact(t) for t in big), "bf16-rounded weights were exported"

    scores = run_eval(config(data, run, f"ckpt={run}", *ds))
    assert scores["num_examples"] == 32 and 0.0 <= scores["accuracy"] <= 1.0
    assert torch.isfinite(torch.tensor(scores["loss"]))

    # Resume with the same settings: DeepSpeed's own files, Adam's state carried on.
    second = run_training(config(data, run, "train.max_steps=3", *ds))
    assert second["step"] == 3
    step3 = run / "checkpoints" / "step000000003"
    assert adam_step(step3) == adam_step(step2) + 1 > 1


def test_fp16_on_cpu_is_refused_before_training(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")  # not a CPU machine: nothing to refuse
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        run_training(config(data, run, "train.max_steps=1", "ds.precision=fp16"))
    assert not (run / "checkpoints").exists()
