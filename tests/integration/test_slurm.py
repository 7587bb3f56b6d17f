"""`LAUNCHER=slurm make launch` on a real SLURM (22.05, brought up in a temp dir by
tests/slurm_cluster.py: two emulated nodes n1, n2 of 2 CPUs on this host, at NodeAddr 127.0.0.1):
a 2-task job trains; a requeued job resumes; the time-limit notice (USR1 to the batch script)
requeues the job itself; scancel --signal=TERM stops a 2-node job at a checkpoint.

Everything goes through the documented command, `bash launch/launch.sh` with LAUNCHER=slurm and
WAIT=1 (what `make launch` runs; not through make, whose `install` prerequisite would reinstall the
venv whenever pyproject.toml is newer). Wall times and resumed steps are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from capsdist.cli import STOPPED
from tests.conftest import ROOT, cli_env
from tests.slurm_cluster import SlurmCluster, slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SUBMITTED = re.compile(r"submitted SLURM job (\d+); log: (.+)")
PROGRESS = re.compile(r"^train: \d+/\d+ steps .* steps/s", re.MULTILINE)


@pytest.fixture(scope="module")
def cluster() -> SlurmCluster:
    with slurm_cluster(nodes=2, cpus=2) as running:
        yield running


class Launch:
    """`LAUNCHER=slurm NPROC=2 WAIT=1 bash launch/launch.sh` running in the background."""

    def __init__(self, cluster: SlurmCluster, tmp_path: Path, args: str, **env: str):
        self.started = time.monotonic()
        settings = {
            "SLURM_CONF": cluster.env["SLURM_CONF"],
            "PATH": cluster.env["PATH"],
            "LAUNCHER": "slurm",
            "NPROC": "2",
            "WAIT": "1",
            "WAIT_POLL_S": "1",
            "CONFIG": "configs/debug_cpu.yaml",
            "ARGS": args,
            "JOB_LOG": str(tmp_path / "logs" / "capsdist-%j.out"),
            "CAPSDIST_PROGRESS_EVERY_S": "0",  # a line at every update: a fast machine ends in 1 s
        }
        self.proc = subprocess.Popen(
            ["bash", "launch/launch.sh"],
            cwd=ROOT,
            env=cli_env(**{**settings, **env}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = self.proc.stdout.readline()
        match = SUBMITTED.match(first)
        assert match, f"launch printed {first!r}; stderr: {self.proc.stderr.read()[-3000:]}"
        self.job, self.log = match.group(1), Path(match.group(2))

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        """launch.sh's exit status (the job's exit code) and the rest of its output."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out + err

    def seconds(self) -> float:
        return time.monotonic() - self.started


def wait_for_file(path: Path, launch: Launch, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if launch.proc.poll() is not None:
            log = launch.log.read_text() if launch.log.exists() else "(no log)"
            raise AssertionError(f"launch ended early: {launch.proc.communicate()}\n{log[-5000:]}")
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.1)


def requeued_and_started_now(cluster: SlurmCluster, job: str, restarts: int) -> None:
    """Wait until the job is back in the queue after its `restarts`-th requeue, then let it start
    early. SLURM holds a requeued job for cred_expire seconds (10 here, 120 by default), which
    keeps a restart clear of the previous run's leftovers; starting it at once needs what
    that delay gives: the old run's slurmstepd gone (it can outlive the requeue by 2-3 s), and a
    later second than the kill (slurmd compares whole seconds: a credential issued in the same
    second counts as revoked, "Job J already killed, do not launch batch job", and the job
    fails)."""
    deadline = time.monotonic() + 300
    while True:
        record = cluster.job(job)
        if record["JobState"] == "PENDING" and int(record["Restarts"]) == restarts:
            break
        assert time.monotonic() < deadline, f"job {job} was not requeued: {record}"
        time.sleep(0.2)
    earliest = time.monotonic() + 2
    while cluster.job_steps_alive(job) or time.monotonic() < earliest:
        assert time.monotonic() < deadline, f"job {job}'s old steps are still running"
        time.sleep(0.2)
    cluster.scontrol("update", f"jobid={job}", "StartTime=now")


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step:09d}" / "capsdist.json"


def test_two_task_job_trains_to_60_steps(cluster, mnist_sample, tmp_path):
    run = tmp_path / "run with spaces"
    launch = Launch(cluster, tmp_path, f"data.root={mnist_sample} 'run.dir={run}'")
    code, out = launch.wait()
    print(f"\n2-task SLURM job {launch.job}: {launch.seconds():.1f} s from submission to exit")

    log = launch.log.read_text()
    assert code == 0, out + log[-3000:]
    assert out.splitlines()[-1] == f"job {launch.job}: COMPLETED, exit code 0; log: {launch.log}"
    assert f"SLURM job {launch.job} restart 0 on " in log and "(1 nodes, 2 tasks)" in log
    # MASTER_ADDR is the first node's NodeAddr (its name, n1 or n2, resolves nowhere);
    # MASTER_PORT follows the job id.
    node_addr = cluster.node_addr(cluster.job(launch.job)["BatchHost"])
    assert f"rendezvous {node_addr}:{15000 + int(launch.job) % 15000}," in log
    # The value with a space arrived whole; both ranks trained (each read its own shards).
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    result = json.loads((run / "train.json").read_text())
    assert result["step"] == 60 and result["replicas_in_sync"] is True
    assert result["run_dir"] == str(run)
    plan = json.loads((run / "data_plan.json").read_text())["shards_by_rank"]
    assert len(plan) == 2 and all(plan) and not set(plan[0]) & set(plan[1])
    # No terminal in a batch job: plain progress lines, never a bar's carriage returns.
    assert "\r" not in log
    assert len(PROGRESS.findall(log)) >= 2 and re.search(r"^train: 60/60 steps", log, re.M)


def test_requeued_job_resumes_and_ends_at_step_60(cluster, mnist_sample, tmp_path):
    """Both ways back: the time-limit notice (`--signal=B:USR1@N` sends USR1 to the batch
    script; `scancel --batch --signal=USR1` sends the same) makes the job stop at a checkpoint
    and requeue itself; `scontrol requeue` (as preemption) stops it at a checkpoint and SLURM
    requeues it. Each restart resumes. Batch 128: ~4x slower steps, so the job is still
    running when each signal comes."""
    run = tmp_path / "run"
    args = f"data.root={mnist_sample} run.dir={run} train.batch_size=128 train.checkpoint_every=15"
    launch = Launch(cluster, tmp_path, f"{args} train.log_every=5")

    wait_for_file(checkpoint(run, 15), launch)
    subprocess.run(["scancel", "--batch", "--signal=USR1", launch.job], env=cluster.env, check=True)
    requeued_and_started_now(cluster, launch.job, restarts=1)
    wait_for_file(checkpoint(run, 30), launch)
    cluster.scontrol("requeue", launch.job)
    requeued_and_started_now(cluster, launch.job, restarts=2)
    code, out = launch.wait()

    log = launch.log.read_text()
    assert code == 0, out + log[-3000:]
    assert f"job {launch.job}: COMPLETED (restarts: 2)" in out
    # One log for the three runs (--open-mode=append), each saying where it is.
    starts = re.findall(rf"SLURM job {launch.job} restart (\d+) on ", log)
    assert starts == ["0", "1", "2"], log[-3000:]
    assert "requeueing job" in log  # the USR1 run requeued itself
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(resumed) == 2 and 15 <= resumed[0] < 30 <= resumed[1] < 60, resumed
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 60
    print(
        f"\nrequeued SLURM job {launch.job}: resumed at steps {resumed} (after USR1, after "
        f"scontrol requeue), finished at 60; {launch.seconds():.1f} s from submission to exit"
    )


def test_scancel_term_stops_a_two_node_job_at_a_checkpoint_with_exit_code_75(
    cluster, mnist_sample, tmp_path
):
    """One task on each node: they meet at the first node's address, and the signal reaches
    both."""
    run = tmp_path / "run"
    args = f"data.root={mnist_sample} run.dir={run} train.max_steps=100000"
    launch = Launch(
        cluster,
        tmp_path,
        f"{args} train.checkpoint_every=1000 train.log_every=5",
        NNODES="2",
        NPROC="1",
        CPUS_PER_TASK="1",
    )
    wait_for_file(run / "metrics.jsonl", launch)
    subprocess.run(["scancel", "--signal=TERM", launch.job], env=cluster.env, check=True)
    code, out = launch.wait()

    log = launch.log.read_text()
    assert code == STOPPED, out + log[-3000:]
    assert out.splitlines()[-1] == f"job {launch.job}: FAILED, exit code 75; log: {launch.log}"
    record = cluster.job(launch.job)
    assert record["ExitCode"] == "75:0" and record["Restarts"] == "0"  # stopped, not requeued
    assert record["NodeList"] == "n[1-2]" and "(2 nodes, 2 tasks)" in log
    plan = json.loads((run / "data_plan.json").read_text())["shards_by_rank"]
    assert len(plan) == 2 and all(plan)  # both ranks trained
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == "SIGTERM"
    step = status["step"]
    assert 5 <= step < 1000  # the step it had reached, not a periodic checkpoint
    assert json.loads(checkpoint(run, step).read_text())["step"] == step
    print(f"\nscancel --signal=TERM: job {launch.job} stopped at step {step} with exit code 75")


def test_submission_asks_for_what_the_variables_say(cluster, mnist_sample, tmp_path):
    """GPUs per node, CPUs per task, partition and time limit reach sbatch (the test node's GPUs
    are counted by SLURM but do not exist: the job is cancelled once its record is read)."""
    env = dict(GPUS_PER_NODE="2", CPUS_PER_TASK="1", PARTITION="debug", TIME_LIMIT="7", WAIT="0")
    args = f"data.root={mnist_sample} run.dir={tmp_path / 'run'} train.max_steps=1"
    launch = Launch(cluster, tmp_path, args, **env)
    record = cluster.job(launch.job)
    subprocess.run(["scancel", launch.job], env=cluster.env, check=True)
    code, _ = launch.wait()
    assert code == 0  # WAIT=0: submitted, not waited for
    assert record["TresPerNode"] == "gres:gpu:2" and record["CPUs/Task"] == "1"
    assert record["Partition"] == "debug" and record["TimeLimit"] == "00:07:00"
    assert record["NumNodes"] in ("1", "1-1") and record["NumTasks"] == "2"
    assert record["NtasksPerN:B:S:C"].startswith("2:")  # --ntasks-per-node=NPROC
    assert record["Requeue"] == "1" and record["StdOut"] == str(launch.log)


def test_more_tasks_than_gpus_per_node_is_refused_before_submitting(cluster, tmp_path):
    jobs_before = cluster.job_ids()
    proc = subprocess.run(
        ["bash", "launch/launch.sh"],
        cwd=ROOT,
        env=cli_env(
            SLURM_CONF=cluster.env["SLURM_CONF"],
            PATH=cluster.env["PATH"],
            LAUNCHER="slurm",
            NPROC="4",
            GPUS_PER_NODE="2",
            CONFIG="configs/debug_cpu.yaml",
            ARGS=f"run.dir={tmp_path / 'run'}",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "launch: error: NPROC=4 tasks per node but GPUS_PER_NODE=2: at most one task per GPU"
    )
    assert cluster.job_ids() == jobs_before  # nothing submitted
