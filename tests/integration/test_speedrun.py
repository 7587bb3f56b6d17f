"""Time-driven training end to end (issue 17), on real MNIST digits: two gloo ranks that agree on
a time-driven learning-rate schedule and on when to evaluate, a resume that continues the
schedule, and the time-to-accuracy figure drawn from both runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from capsdist.distributed import free_port
from capsdist.distributed.schedules import BudgetSchedule
from tests.conftest import ROOT, CliResult, cli_env, run_capsdist

pytestmark = pytest.mark.slow

DEBUG = ["-c", "configs/debug_cpu.yaml"]
LR = 1e-3  # debug_cpu.yaml's train.lr (the default)


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def two_rank_run(mnist_sample, tmp_path_factory) -> tuple[Path, CliResult]:
    """2 ranks (torchrun, gloo), a 3-s budget driving a cosine schedule, an evaluation at the
    first log step after every second of training, shifts during the first 30 %."""
    run = tmp_path_factory.mktemp("speedrun") / "two_ranks"
    args = (
        f"data.root={mnist_sample} run.dir={run} train.max_steps=100000 train.time_limit_s=3 "
        "train.lr_schedule=cosine train.warmup_frac=0.2 train.eval_every_s=1 "
        "train.eval_examples=200 data.shift_until=0.3 train.log_every=4 train.checkpoint_every=40"
    )
    env = cli_env(
        CONFIG="configs/debug_cpu.yaml",
        ARGS=args,
        NPROC="2",
        MAX_RESTARTS="0",
        MASTER_PORT=str(free_port()),
    )
    proc = subprocess.run(
        ["bash", "launch/launch.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return run, CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.distributed
def test_two_ranks_follow_one_time_driven_schedule_and_evaluate_by_the_clock(two_rank_run):
    run, out = two_rank_run
    assert out.returncode == 0, out.stderr[-3000:]
    result = final_json(out.stdout)
    # The ranks' learning rates come from the main rank's clock: any disagreement would have
    # made the replicas' weights differ.
    assert result["replicas_in_sync"] is True
    lines = metric_lines(run)
    assert all(line["step"] % 4 == 0 for line in lines[:-1])
    times = [line["train_time_s"] for line in lines]
    assert times == sorted(times) and times[-1] >= 3.0  # the budget ended the run
    # Each log line's lr follows the schedule with the horizon estimated at the line before.
    cosine = BudgetSchedule("cosine", 0.2, 0.04, 0.01, 0.0)
    for before, line in zip(lines, lines[1:], strict=False):
        cosine.total_steps = before["horizon_steps"]
        assert line["lr"] == pytest.approx(LR * cosine(line["step"]), rel=1e-9), line["step"]
    assert lines[-1]["lr"] < 0.5 * LR  # the end of a half cosine
    # Evaluations: at the first log step after 1, 2, ... training seconds, and at the end.
    evals = [line for line in lines if "eval_accuracy" in line]
    assert evals[-1] is lines[-1] and len(evals) >= 2
    for before, line in zip([0.0, *times], lines[:-1], strict=False):
        crossed_a_second = int(line["train_time_s"]) > int(before)
        assert crossed_a_second == ("eval_accuracy" in line), line["step"]
    eval_seconds = [line["eval_time_s"] for line in evals]
    assert eval_seconds[0] > 0 and eval_seconds == sorted(eval_seconds)
    assert result["eval_accuracy"] == evals[-1]["eval_accuracy"] > 0.2  # 10 classes: chance 0.1


@pytest.fixture(scope="module")
def resumed_run(mnist_sample, tmp_path_factory) -> tuple[Path, CliResult, dict, CliResult]:
    """A 2-s onecycle run, then the same run.dir again (2 s more: DeepSpeed's files, with the
    schedule's state, read weights-only); with the marker of the first run's last checkpoint
    (the second run's prune it)."""
    run = tmp_path_factory.mktemp("speedrun") / "resumed"
    common = [
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=100000",
        "train.time_limit_s=2",
        "train.lr_schedule=onecycle",
        "train.eval_every_s=1",
        "eval.max_examples=200",
        "train.log_every=5",
    ]
    first = run_capsdist("train", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    end = first.result["step"]
    marker = json.loads((run / "checkpoints" / f"step{end:09d}" / "capsdist.json").read_text())
    second = run_capsdist("train", *common)
    return run, first, marker, second


def test_a_resumed_onecycle_run_continues_its_schedule_and_clock(resumed_run):
    run, first, marker, second = resumed_run
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout, second.stderr[-3000:]
    end = first.result["step"]
    pacing = marker["resume"]["pacing"]
    # The first job's budget ran out: its schedule reached its end, and the resumed job does
    # not start another warm-up and decay: the learning rate stays at lr x lr_final_factor.
    assert pacing["progress"] == 1.0
    assert pacing["train_time_s"] == pytest.approx(first.result["train_time_s"])
    lines = metric_lines(run)
    resumed = [line for line in lines if line["step"] > end]
    assert resumed and [line["step"] for line in lines[: -len(resumed)]][-1] == end
    for line in resumed:
        assert line["lr"] == pytest.approx(LR * 0.01, rel=1e-9), line["step"]
    # The training clock goes on from the first job's seconds.
    assert resumed[0]["train_time_s"] > pacing["train_time_s"]
    assert second.result["train_time_s"] >= pacing["train_time_s"] + 2.0


def test_time_to_accuracy_figure_of_two_runs(two_rank_run, resumed_run, tmp_path):
    runs = [two_rank_run[0], resumed_run[0]]
    figure = tmp_path / "curves.png"
    out = run_capsdist(
        "viz", "--curves", *runs, "--labels", "cosine, 2 ranks", "onecycle, resumed",
        "--out", figure,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = out.result["runs"]
    for run, row in zip(runs, summary, strict=True):
        evals = [line for line in metric_lines(run) if "eval_accuracy" in line]
        assert row["points"] == len(evals) >= 2
        assert row["last_eval_accuracy"] == evals[-1]["eval_accuracy"]
    assert [row["label"] for row in summary] == ["cosine, 2 ranks", "onecycle, resumed"]
