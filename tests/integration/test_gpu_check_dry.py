"""`make gpu-check`'s CPU dry run (GPU_CHECK_DRY=1), so the script cannot rot between GPU
sessions: the same shell entry point and stages as on a GPU, with tiny sizes, on Fashion-MNIST
IDX files written here in the real format."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, cli_env
from tests.unit.test_data_idx import write_mnist

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_every_stage_and_writes_its_report(tmp_path):
    write_mnist(tmp_path / "idx", np.random.default_rng(0), n_train=200, n_test=64, gz=True)
    out = tmp_path / "out"
    env = cli_env(
        GPU_CHECK_DRY="1",
        GPU_PYTHON=sys.executable,
        GPU_CARRY=str(tmp_path / "no_carry"),  # CI has no wheels: nothing to install
    )
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--out", out, "--data", tmp_path / "idx"]
        + ["--work", tmp_path / "work"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["dry_run"], report
    assert set(report["stages"]) == {"tests", "bench", "data", "train"}
    assert all(stage["ok"] for stage in report["stages"].values()), report["stages"]

    tests = report["tests"]
    assert tests["passed"] > 0 and tests["failures"] == tests["errors"] == 0, tests
    runs = report["bench"]["runs"]
    assert [r["name"] for r in runs] == ["mnist fp32", "mnist bf16", "cifar10 fp32", "cifar10 bf16"]
    for run in runs:
        assert run["images_per_s"] > 0 and run["conv_floor_ms"] > 0 and run["mfu"] is None
        assert run["config"]["precision"] == run["name"].split()[1]
        assert run["plain"]["images_per_s"] > 0
    assert runs[1]["mfu_precisions"] == {"conv": "bf16", "capsules": "fp32", "decoder": "bf16"}

    trained = report["train"]
    step = trained["train"]["step"]
    assert 0 < step < 30000 and step % 2 == 0  # the 3 s limit stops it at a log step (every 2)
    assert trained["eval"]["num_examples"] == 64 and 0 <= trained["eval"]["accuracy"] <= 1
    assert report["imported_ray_or_wandb"] == []

    table = (out / "gpu_check.md").read_text()
    assert "## bench model" in table and "## Fashion-MNIST training" in table
    assert "| configs/cifar10.yaml ds.precision=bf16" in table and "| True |" in table
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] is True
