"""`LAUNCHER=ray` on a real two-node Ray cluster (head 127.0.0.2 + a second raylet 127.0.0.3,
one CPU each: tests/ray_cluster.py), through the documented command
`RAY_ADDRESS=... LAUNCHER=ray NNODES=2 NPROC=1 CONFIG=... ARGS=... bash launch/launch.sh`:
workers on different nodes, checkpoints reported to S3 (moto's real server) and restored from
it into a run.dir that lost them, and a SIGKILLed worker that Ray Train restarts from the last
checkpoint. Wall times and resumed steps are printed for docs/results.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from capsdist.distributed import free_port
from tests.conftest import ROOT, CliResult, cli_env
from tests.ray_cluster import HEAD_IP, WORKER_IP, two_node_ray_cluster
from tests.unit.test_data_remote import serve_s3

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BUCKET = "capsdist-ray"
RUN_TIMEOUT_S = 600  # one run takes ~20-50 s here; a loaded CI machine must not fail it
# Printed by capsdist/tune/trial.py:ray_launch_worker in every worker. (Ray Train V2 passes a
# worker's prints to the driver's stdout and, through its logger, to its stderr: read stdout.)
WORKER_LINE = re.compile(r"ray worker rank (\d+)/(\d+) local rank \d+ pid (\d+) node (\S+)")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


@pytest.fixture(scope="module")
def cluster():
    """moto's S3 server first, so that the raylets (and Ray's workers) inherit its AWS_*
    variables, as a real cluster's nodes have credentials; then the two nodes."""
    import boto3

    with serve_s3() as endpoint, two_node_ray_cluster() as ray_env:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield {**ray_env, "endpoint": endpoint}


def launch_env(ray_env: dict, args: str) -> dict[str, str]:
    return cli_env(
        LAUNCHER="ray",
        NNODES="2",
        NPROC="1",
        CONFIG="configs/debug_cpu.yaml",
        ARGS=args,
        MASTER_PORT=str(free_port()),
        RAY_ADDRESS=ray_env["RAY_ADDRESS"],
        RAY_TMPDIR=ray_env["RAY_TMPDIR"],
        RAY_AUTH_MODE="disabled",
        RAY_DEDUP_LOGS="0",  # every worker's lines, not "[repeated 2x across cluster]"
    )


def launch(ray_env: dict, args: str) -> tuple[CliResult, float]:
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "launch/launch.sh"],
        cwd=ROOT,
        env=launch_env(ray_env, args),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr), time.monotonic() - started


def workers(output: str) -> dict[int, list[tuple[int, str]]]:
    """rank → [(pid, node IP)] of every worker that started, in order (restarts append)."""
    seen: dict[int, list[tuple[int, str]]] = {}
    for rank, _, pid, ip in WORKER_LINE.findall(output):
        entry = (int(pid), ip)
        if entry not in seen.setdefault(int(rank), []):
            seen[int(rank)].append(entry)
    return seen


def bucket_keys(endpoint: str, prefix: str) -> set[str]:
    import boto3

    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=BUCKET, Prefix=prefix
    )
    return {item["Key"][len(prefix) :] for item in listing.get("Contents", [])}


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[ray cluster] {line}", flush=True)


def test_several_nodes_without_ray_address_fail_before_anything_starts():
    env = cli_env(LAUNCHER="ray", NNODES="2", NPROC="1", CONFIG="configs/debug_cpu.yaml")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["bash", "launch/launch.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("launch: error: LAUNCHER=ray with NNODES=2 needs RAY_ADDRESS")


def test_two_nodes_train_in_sync_report_to_s3_and_restore_a_lost_run_dir(
    cluster, mnist_sample, tmp_path, capsys
):
    """STRICT_SPREAD puts the two workers on the two nodes; ZeRO-1 makes each rank write an
    optimizer shard of its own, and both reach the bucket as one checkpoint. Then run.dir is
    lost (a node without the shared file system): the rerun restores the last checkpoint from
    S3, resumes at its step and trains on."""
    run = tmp_path / "run"
    args = (
        f"data.root={mnist_sample} run.dir={run} ds.zero_stage=1 "
        f"ray.placement_strategy=STRICT_SPREAD ray.storage_path=s3://{BUCKET}/runs"
    )
    out, wall = launch(cluster, args)
    assert out.returncode == 0, out.stderr[-5000:]
    result = out.result
    assert result["step"] == 60 and result["replicas_in_sync"] is True
    ranks = workers(out.stdout)
    assert sorted(ranks) == [0, 1]
    nodes = {ranks[0][0][1], ranks[1][0][1]}
    assert nodes == {HEAD_IP, WORKER_IP}, ranks  # one worker on each node
    assert json.loads((run / "train.json").read_text())["replicas_in_sync"] is True
    # Ray Train's copy: one folder per checkpoint, merged from both ranks' uploads.
    stored = bucket_keys(cluster["endpoint"], "runs/run/step000000060/")
    assert {
        "capsdist.json",
        "config.yaml",
        "model.safetensors",
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    } <= stored, stored
    report(capsys, f"2 nodes, 60 steps, S3 storage: {wall:.1f} s wall (launch to exit)")

    shutil.rmtree(run)
    again, wall = launch(cluster, args + " train.max_steps=80")
    assert again.returncode == 0, again.stderr[-5000:]
    assert "restored Ray Train's checkpoint of step 60" in again.stdout
    assert [int(s) for s in RESUMED.findall(again.stdout)] == [60]
    assert again.result["step"] == 80 and again.result["replicas_in_sync"] is True
    assert (run / "checkpoints" / "step000000060" / "capsdist.json").exists()
    stored = bucket_keys(cluster["endpoint"], "runs/run/")
    kept = {key.split("/")[0] for key in stored if key.startswith("step")}
    assert kept == {"step000000040", "step000000060", "step000000080"}  # train.keep_last=3
    assert "step000000080/capsdist.json" in stored
    report(capsys, f"run.dir lost, restored from S3 at step 60 -> 80: {wall:.1f} s wall")


def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_checkpoint(
    cluster, mnist_sample, tmp_path, capsys
):
    """SIGKILL the rank-1 worker once the first checkpoint is complete: Ray Train restarts the
    worker group (ray.max_failures; the ranks may swap nodes) and the run resumes from the last
    checkpoint and ends at step 60."""
    run = tmp_path / "run"
    first = run / "checkpoints" / "step000000020" / "capsdist.json"
    # A larger batch makes the 40 steps after the first checkpoint last seconds, not one.
    args = (
        f"data.root={mnist_sample} run.dir={run} train.batch_size=64 "
        "ray.placement_strategy=STRICT_SPREAD ray.max_failures=2"
    )
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    started = time.monotonic()
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(
            ["bash", "launch/launch.sh"],
            cwd=ROOT,
            env=launch_env(cluster, args),
            stdout=out,
            stderr=err,
            text=True,
        )

    def logged() -> str:
        return stdout.read_text()

    try:
        victim = None
        while victim is None or not first.exists():
            assert proc.poll() is None, f"ended before the kill:\n{logged()[-5000:]}"
            assert time.monotonic() - started < RUN_TIMEOUT_S, "no checkpoint in time"
            found = workers(logged()).get(1)
            victim = found[0][0] if found else None
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed_after = time.monotonic() - started
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = logged()
    wall = time.monotonic() - started
    assert proc.returncode == 0, stderr.read_text()[-5000:]
    resumed = [int(s) for s in RESUMED.findall(output)]
    assert len(resumed) == 1 and resumed[0] >= 20, output[-5000:]
    ranks = workers(output)
    assert len(ranks[1]) == 2 and ranks[1][1][0] != victim  # rank 1 started again, a new process
    result = json.loads(stdout.read_text().strip().splitlines()[-1])
    assert result["step"] == 60 and result["replicas_in_sync"] is True
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 60
    report(
        capsys,
        f"worker killed {killed_after:.1f} s after launch, resumed at step {resumed[0]}, "
        f"finished at 60: {wall:.1f} s wall",
    )
