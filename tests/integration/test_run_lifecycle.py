"""A run's life across jobs: stop signals, crashes, the run.dir lock and reruns (issue 12)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsdist.cli import STOPPED
from tests.conftest import ROOT, cli_env, run_capsdist

pytestmark = pytest.mark.slow

DEBUG = ["-c", "configs/debug_cpu.yaml"]


def start_training(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "capsdist", "train", *DEBUG, *args],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_logged_steps(run: Path, proc: subprocess.Popen, lines: int = 2) -> list[int]:
    """The steps in metrics.jsonl once it holds `lines` lines: the job is in its loop."""
    path, deadline = run / "metrics.jsonl", time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "training logged nothing"
        steps = (
            [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []
        )
        if len(steps) >= lines:
            return steps
        time.sleep(0.05)


def logged_steps(run: Path, key: str = "loss") -> list[int]:
    """The steps of the metrics.jsonl lines with `key` (training's, not `capsdist validate`'s)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if key in line]


def test_sigterm_stops_at_a_checkpoint_of_that_step_and_a_rerun_resumes(mnist_sample, tmp_path):
    run = tmp_path / "run"
    config = [f"data.root={mnist_sample}", f"run.dir={run}", "train.log_every=2"]
    proc = start_training(*config, "train.max_steps=100000", "train.checkpoint_every=1000")
    before = wait_for_logged_steps(run, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == STOPPED, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == "SIGTERM"
    step = status["step"]
    assert before[-1] <= step < 1000  # the step in progress, not the last periodic checkpoint
    marker = run / "checkpoints" / f"step{step:09d}" / "capsdist.json"
    assert json.loads(marker.read_text())["step"] == step
    exported = (run / "model.safetensors").read_bytes()
    assert exported == (marker.parent / "model.safetensors").read_bytes()

    again = run_capsdist("train", *DEBUG, *config, f"train.max_steps={step + 2}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {step}" in again.stdout and again.result["step"] == step + 2
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    steps = logged_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == step + 2


def test_a_second_training_on_the_same_run_dir_is_refused_naming_the_first(mnist_sample, tmp_path):
    run = tmp_path / "run"
    config = [f"data.root={mnist_sample}", f"run.dir={run}", "train.log_every=2"]
    first = start_training(*config, "train.max_steps=100000", "train.checkpoint_every=1000")
    wait_for_logged_steps(run, first)
    config_before = (run / "config.yaml").read_text()

    second = run_capsdist("train", *DEBUG, *config, "train.max_steps=100000", "seed=3")
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)

    assert second.returncode == 2
    message = second.stderr.strip().splitlines()[-1]
    assert f"in use by pid {first.pid} on host {socket.gethostname()}" in message, message
    assert str(run) in message and "Traceback" not in second.stderr
    assert (run / "config.yaml").read_text() == config_before
    assert first.returncode == STOPPED  # the first job ran on, undisturbed


def test_a_second_ctrl_c_quits_at_once_marking_failed_and_the_rerun_logs_each_step_once(
    mnist_sample, tmp_path
):
    """In-process (the sweeps' API): Ctrl-C, then Ctrl-C again a second later, from inside the
    loop at step 6, after the checkpoint at step 4; the rerun replays steps 5 and 6."""
    from capsdist.config import load_config
    from capsdist.eval import run_validate
    from capsdist.train import run_training

    run = tmp_path / "run"
    config = [
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "train.log_every=1",
    ]
    cfg = load_config(["configs/debug_cpu.yaml"], config)

    def ctrl_c_twice(step: int, metrics: dict, model) -> None:
        if step == 6:
            signal.raise_signal(signal.SIGINT)  # first press: stop after this step...
            signal.raise_signal(signal.SIGINT)  # ...the same press forwarded by torchrun
            time.sleep(1.1)
            signal.raise_signal(signal.SIGINT)  # a second press: quit now

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, callbacks=[ctrl_c_twice])
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("KeyboardInterrupt")
    assert status["step"] == 4  # where a rerun resumes
    assert not (run / "checkpoints" / "step000000006").exists()
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]

    cfg.validate.timeout_s = 600  # it must stop because training failed, not time out
    cfg.eval.max_examples = 100
    validated = run_validate(cfg)
    assert validated["training"] == "failed" and validated["num_checkpoints"] == 1

    # DeepSpeed keeps its process group for the life of a process: the rerun is a new one.
    again = run_capsdist("train", *DEBUG, *config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 4" in again.stdout
    assert logged_steps(run) == list(range(1, 9))


def test_rerun_with_other_settings_or_fewer_steps_is_refused(mnist_sample, tmp_path):
    run = tmp_path / "run"
    config = [*DEBUG, f"data.root={mnist_sample}", f"run.dir={run}", "train.checkpoint_every=2"]
    first = run_capsdist("train", *config, "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    other_lr = run_capsdist("train", *config, "train.max_steps=4", "train.lr=0.01")
    assert other_lr.returncode == 2
    message = other_lr.stderr.strip().splitlines()[-1]
    assert "train.lr: 0.001 there, 0.01 here" in message and "new run.dir" in message, message
    fewer = run_capsdist("train", *config, "train.max_steps=2")
    assert fewer.returncode == 2
    message = fewer.stderr.strip().splitlines()[-1]
    assert "checkpoint at step 4" in message and "train.max_steps=2" in message, message
    assert "Traceback" not in other_lr.stderr + fewer.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # config.yaml included: it still describes the weights

    # How the run is logged, evaluated or checkpointed may change; more steps continue it.
    runtime = ["train.log_every=1", "train.checkpoint_every=3", "eval.batch_size=10"]
    more = run_capsdist("train", *config, *runtime, "train.max_steps=6")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "at step 4" in more.stdout and more.result["step"] == 6


def test_resumed_metrics_keep_the_steps_up_to_the_checkpoint(tmp_path):
    """A job killed at step 9 logged 2..8 and half a line; it resumes from its checkpoint at 4."""
    from capsdist.track import JsonlSink

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (2, 4, 6, 8)) + '{"st')
    sink = JsonlSink(path, resumed_at=4)
    sink.log(5, {"loss": 0.5})
    sink.close()
    assert logged_steps(tmp_path) == [2, 4, 5]


def test_stop_signals_outside_the_main_thread_keep_the_default_handlers():
    """Ray Tune runs a trial's training in a thread, where Python cannot set handlers."""
    import threading

    from capsdist.train.loop import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    failures = []

    def train_in_a_thread() -> None:
        try:
            with StopSignals():
                failures.append(signal.getsignal(signal.SIGTERM) is not before)
        except ValueError as err:  # "signal only works in main thread"
            failures.append(err)

    thread = threading.Thread(target=train_in_a_thread)
    thread.start()
    thread.join()
    assert failures == [False]
