"""Ranks agree on stopping without a per-step collective (issue 15 item 3): a stop signal that
reaches one rank only stops every rank at the same log step, with one checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.test_fault_tolerance import final_json, finish, launch_env, start, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def rank_pid(torchrun_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of the worker of `rank` among torchrun's children (from its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = subprocess.run(
            ["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True
        ).stdout.split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under pid {torchrun_pid}")


def test_a_signal_to_one_rank_stops_both_at_the_same_log_step(mnist_sample, tmp_path):
    run = tmp_path / "run"
    steps = "train.max_steps=100000 train.checkpoint_every=1000 train.log_every=4"
    env = launch_env(mnist_sample, run, steps, NPROC="2", MAX_RESTARTS="0")
    proc = start(["bash", "launch/launch.sh"], env)
    wait_for(run / "metrics.jsonl", proc)
    os.kill(rank_pid(proc.pid, rank=1), signal.SIGUSR1)  # rank 1 only: rank 0 never sees it
    result = finish(proc, timeout=300)

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == "SIGUSR1", result.stderr[-3000:]
    step = status["step"]
    assert step % 4 == 0  # decided at a log step
    assert (run / "checkpoints" / f"step{step:09d}" / "capsdist.json").exists()
    stopped = final_json(result.stdout)
    assert stopped["step"] == step and stopped["stopped"] == "SIGUSR1"
    assert stopped["replicas_in_sync"] is True  # both ranks stopped after the same step
