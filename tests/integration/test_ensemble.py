"""`capsdist ensemble-eval` over three real (tiny) CapsNets, checked against combining the
members' predictions by hand; and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from capsdist.config import load_config
from capsdist.data import read_meta
from capsdist.eval import build_eval_reader, load_model
from capsdist.run_dir import load_weights
from tests.conftest import run_capsdist

pytestmark = pytest.mark.slow

DEBUG = ["-c", "configs/debug_cpu.yaml"]
EVAL_EXAMPLES = 300


@pytest.fixture(scope="module")
def members(mnist_sample, tmp_path_factory):
    """Three debug CapsNets, seeds 0-2, 20 steps each (different enough to disagree)."""
    root = tmp_path_factory.mktemp("ensemble")
    for seed in range(3):
        out = run_capsdist(
            "train",
            *DEBUG,
            f"data.root={mnist_sample}",
            f"run.dir={root / f'm{seed}'}",
            f"seed={seed}",
            "train.max_steps=20",
        )
        assert out.returncode == 0, out.stderr
    return root


def by_hand(mnist_sample, members):
    """Each member's lengths over the same examples, summed, argmax: the reference's combine."""
    cfg = load_config(
        ["configs/debug_cpu.yaml"],
        [f"data.root={mnist_sample}", f"eval.max_examples={EVAL_EXAMPLES}"],
    )
    models = [load_model(members / f"m{i}" / "model.safetensors", cfg, "cpu") for i in range(3)]
    lengths, labels = [[] for _ in models], []
    with torch.no_grad():
        for batch in build_eval_reader(cfg, read_meta(cfg.data.root), torch.device("cpu")).epoch(0):
            labels.append(batch.labels)
            for i, model in enumerate(models):
                lengths[i].append(model(batch.images).lengths)
    labels = torch.cat(labels)
    member_preds = [torch.cat(x).argmax(1) for x in lengths]
    summed = sum(torch.cat(x) for x in lengths)
    return {
        "member_accuracies": [int((p == labels).sum()) / len(labels) for p in member_preds],
        "ensemble_accuracy": int((summed.argmax(1) == labels).sum()) / len(labels),
        "agreement_all": int(
            ((member_preds[0] == member_preds[1]) & (member_preds[1] == member_preds[2])).sum()
        )
        / len(labels),
    }


def test_ensemble_eval_matches_combining_by_hand(mnist_sample, members, tmp_path):
    out = run_capsdist(
        "ensemble-eval",
        *DEBUG,
        f"data.root={mnist_sample}",
        f"eval.max_examples={EVAL_EXAMPLES}",
        "--checkpoints",
        str(members / "m{}"),
        "--num-trials",
        "3",
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    result = out.result
    expected = by_hand(mnist_sample, members)
    assert result["num_examples"] == EVAL_EXAMPLES
    assert result["member_accuracies"] == pytest.approx(expected["member_accuracies"], abs=1e-9)
    assert result["ensemble_accuracy"] == pytest.approx(expected["ensemble_accuracy"], abs=1e-9)
    assert result["agreement_all"] == pytest.approx(expected["agreement_all"], abs=1e-9)
    assert "ensemble of 3" in out.stdout  # the printed table
    assert (
        json.loads((tmp_path / "ensemble.json").read_text())["ensemble_accuracy"]
        == (result["ensemble_accuracy"])
    )
    assert "| **ensemble of 3** |" in (tmp_path / "ensemble.md").read_text()
    assert "ensemble:" in out.stderr  # the progress bar


def test_pattern_with_fewer_members_than_num_trials_fails(mnist_sample, members):
    out = run_capsdist(
        "ensemble-eval",
        *DEBUG,
        f"data.root={mnist_sample}",
        "--checkpoints",
        str(members / "m{}"),
        "--num-trials",
        "5",
    )
    assert out.returncode == 2
    assert "m3" in out.stderr and "3 of 5 found" in out.stderr
    globbed = run_capsdist(
        "ensemble-eval",
        *DEBUG,
        f"data.root={mnist_sample}",
        "--checkpoints",
        str(members / "m*"),
        "--num-trials",
        "4",
    )
    assert globbed.returncode == 2 and "fewer than --num-trials 4" in globbed.stderr


def test_members_of_different_architectures_are_refused(mnist_sample, members, tmp_path):
    state, config_yaml = load_weights(members / "m0" / "model.safetensors")
    config = yaml.safe_load(config_yaml)
    config["model"]["num_prime_capsules"] = 8  # what another architecture's export records
    odd = tmp_path / "odd.safetensors"
    save_file(state, str(odd), metadata={"capsdist_config": yaml.safe_dump(config)})
    out = run_capsdist(
        "ensemble-eval",
        *DEBUG,
        f"data.root={mnist_sample}",
        "--checkpoints",
        str(members / "m0"),
        str(members / "m1"),
        str(odd),
    )
    assert out.returncode == 2
    assert "different architectures" in out.stderr and "num_prime_capsules" in out.stderr
