"""`capsdist sweep` with real Ray Tune (num_cpus=2) on real MNIST digits: a 4-trial sweep, an
interrupted sweep resumed, the shipped sweep files, and the refusals of bad search spaces."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsdist.tune import SweepError, load_sweep
from tests.conftest import ROOT, cli_env, run_capsdist

SWEEP = """\
# a tiny sweep for the tests
sweep:
  configs: [{root}/configs/debug_cpu.yaml]
  cpus_per_trial: {cpus}
  workers_per_trial: {workers}
  max_concurrent_trials: {concurrent}
  ray_num_cpus: 2
  dir: {dir}
space:
{space}
overrides:
  data.root: {data}
  train.max_steps: {steps}
  train.eval_every: 10
  train.checkpoint_every: 10
  eval.max_examples: 200
"""


def write_sweep(tmp_path, data, space, steps=10, cpus=0.5, concurrent=0, workers=1) -> Path:
    path = tmp_path / "sweep.yaml"
    text = SWEEP.format(
        root=ROOT,
        cpus=cpus,
        workers=workers,
        concurrent=concurrent,
        dir=tmp_path / "out",
        data=data,
        steps=steps,
        space="\n".join(f"  {line}" for line in space),
    )
    path.write_text(text)
    return path


def load_config_from(path):
    from capsdist.config import load_config

    return load_config([path])


@pytest.mark.slow
def test_sweep_interrupted_resumes_and_writes_table_and_best_config(mnist_sample, tmp_path):
    """Four trials on 2 CPUs; Ctrl+C once one has finished; --resume completes the rest
    without training the finished ones again, then the table and the best config."""
    space = [
        "model.routing_iters: {grid: [1, 2]}",
        "model.num_prime_capsules: {grid: [2, 4]}",
        "train.lr: {loguniform: [1.0e-3, 3.0e-3]}",
        "model.leaky_routing: {choice: [false, true]}",
    ]
    sweep = write_sweep(tmp_path, mnist_sample, space, steps=20, cpus=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "capsdist", "sweep", "-c", str(sweep)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    trials = tmp_path / "out" / "trials"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(trials.glob("*/train.json")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    finished = {p: p.stat().st_mtime_ns for p in trials.glob("*/train.json")}
    assert finished, "no trial finished in time"
    proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops the trials
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-3000:]
    assert "interrupted" in stderr and "--resume" in stderr
    assert len(list(trials.glob("*/train.json"))) < 4, "finished before the interruption"

    out = run_capsdist("sweep", "-c", sweep, "--resume", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for path, mtime in finished.items():  # finished trials were not trained again
        assert path.stat().st_mtime_ns == mtime
    result = out.result
    assert result["num_trials"] == 4 and result["num_errors"] == 0
    assert set(result["best_config"]) == {line.split(":")[0] for line in space}
    assert 0.0 < result["best_accuracy"] <= 1.0
    sweep_dir = tmp_path / "out"
    rows = (sweep_dir / "sweep_results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("trial,model.routing_iters")
    accuracies = [float(r.split(",")[5]) for r in rows[1:]]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[0] == result["best_accuracy"]
    assert (sweep_dir / "sweep_results.md").read_text() in out.stdout  # the printed table
    grid = {(int(r.split(",")[1]), int(r.split(",")[2])) for r in rows[1:]}
    assert grid == {(1, 2), (1, 4), (2, 2), (2, 4)}  # routing_iters x num_prime_capsules
    assert (sweep_dir / "best_config.yaml").read_text().startswith("# Best trial")
    best_cfg = load_config_from(sweep_dir / "best_config.yaml")
    assert best_cfg.model.routing_iters == result["best_config"]["model.routing_iters"]
    assert best_cfg.train.lr == pytest.approx(result["best_config"]["train.lr"])
    for trial_dir in trials.iterdir():  # every trial ran the real loop to the end
        metrics = [json.loads(x) for x in (trial_dir / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 20 and "eval_accuracy" in metrics[-1]
    assert "sweep:" in out.stderr  # the progress bar
    again = run_capsdist("sweep", "-c", sweep, timeout=60)  # no --resume: refuses to overwrite
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
def test_trial_with_two_ray_train_workers_trains_data_parallel(mnist_sample, tmp_path):
    """workers_per_trial=2: one trial is a Ray Train run of two gloo workers; both train (each
    its own shards, replicas equal at the end) and rank 0's validation reaches Tune."""
    sweep = write_sweep(
        tmp_path, mnist_sample, ["model.routing_iters: {grid: [2]}"], cpus=1, workers=2
    )
    out = run_capsdist("sweep", "-c", sweep, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = out.result
    assert result["num_trials"] == 1 and result["num_errors"] == 0
    assert 0.0 < result["best_accuracy"] <= 1.0
    run_dir = Path(result["best_run_dir"])
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [10]
    assert evals[-1]["eval_accuracy"] == result["best_accuracy"]  # what Tune got is rank 0's
    train = json.loads((run_dir / "train.json").read_text())
    assert train["step"] == 10 and train["replicas_in_sync"] is True
    plan = json.loads((run_dir / "data_plan.json").read_text())["shards_by_rank"]
    assert len(plan) == 2 and not set(plan[0]) & set(plan[1])  # two ranks, disjoint shards


@pytest.mark.slow
def test_trial_needing_more_cpus_than_ray_has_is_refused(mnist_sample, tmp_path):
    """2 workers x 1.5 CPUs on a 2-CPU Ray instance would wait forever: a clear error instead."""
    sweep = write_sweep(
        tmp_path, mnist_sample, ["model.routing_iters: {grid: [2]}"], cpus=1.5, workers=2
    )
    out = run_capsdist("sweep", "-c", sweep, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "one trial needs 3 CPUs" in out.stderr and "sweep.workers_per_trial=2" in out.stderr


def test_shipped_sweep_files_load_and_start_with_a_comment():
    for path in sorted(Path(ROOT, "configs", "sweeps").glob("*.yaml")):
        assert path.read_text().startswith("#"), path
        spec = load_sweep(path)
        assert spec.space and spec.num_trials() >= 7, path
    assert load_sweep(Path(ROOT, "configs/sweeps/routing.yaml")).num_trials() >= 8


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (["model.routing_iter: {grid: [1, 3]}"], "did you mean 'model.routing_iters'"),
        ([], "search space is empty"),
        (["model.padding: {grid: [VALID, SAME, FULL]}"], "model.padding must be VALID or SAME"),
        (["train.lr: {loguniform: [0.01, 0.001]}"], "low < high"),
        (["train.lr: {normal: [0, 1]}"], "unknown distribution 'normal'"),
    ],
)
def test_bad_search_spaces_fail_before_ray_starts(tmp_path, space, message):
    sweep = write_sweep(tmp_path, "data/x", space)
    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        load_sweep(sweep)


def test_bad_sweep_is_one_line_error_from_the_cli(tmp_path):
    sweep = write_sweep(tmp_path, "data/x", ["model.num_prime_capsule: {grid: [4, 8]}"])
    out = run_capsdist("sweep", "-c", sweep, timeout=60)
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("capsdist sweep: error: ") and str(sweep) in line
    assert "model.num_prime_capsules" in line
