"""The parts of `LAUNCHER=ray` that need no cluster: the `ray.*` keys, the GPU and storage rules,
which rank uploads which checkpoint file, restoring a reported checkpoint into run.dir (with
Ray's real `Checkpoint`), and the errors given before Ray starts. The cluster runs are in
tests/integration/test_ray_cluster.py."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import ray.train
import torch.distributed as dist
import torch.multiprocessing as mp

from capsdist.config import ConfigError, load_config
from capsdist.distributed import free_port
from capsdist.run_dir import CheckpointError
from capsdist.tune.checkpoints import (
    agree_on_resume_step,
    prune_unmarked,
    restore_checkpoint,
    written_by,
)
from capsdist.tune.storage import StorageError, check_storage, experiment_path, ray_storage
from capsdist.tune.trial import gpus_per_worker
from tests.conftest import ROOT, cli_env
from tests.unit.test_data_remote import serve_s3


def test_ray_keys_have_working_defaults():
    ray_cfg = load_config(["configs/debug_cpu.yaml"]).ray
    assert (ray_cfg.gpus_per_worker, ray_cfg.cpus_per_worker, ray_cfg.max_failures) == (-1, 1, 3)
    assert (ray_cfg.storage_path, ray_cfg.placement_strategy) == ("", "PACK")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ray.gpus_per_worker=-2", "must be -1 (auto) or between 0 and 1"),
        ("ray.gpus_per_worker=2", "a worker trains on one GPU"),
        ("ray.gpus_per_worker=nan", "ray.gpus_per_worker"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker must be a finite number > 0"),
        ("ray.max_failures=-1", "ray.max_failures must be a whole number >= 0"),
        ("ray.placement_strategy=RANDOM", "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
        ("ray.storage_path=s3://", "names no location"),
    ],
)
def test_bad_ray_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(["configs/debug_cpu.yaml"], [override])


def test_auto_gpus_follow_the_cluster_not_the_driver():
    assert gpus_per_worker(-1, {"CPU": 64.0, "GPU": 8.0}) == 1.0  # a CPU-only head is fine
    assert gpus_per_worker(-1, {"CPU": 64.0}) == 0.0
    assert gpus_per_worker(0.5, {"CPU": 2.0}) == 0.5  # as configured
    assert gpus_per_worker(0, {"GPU": 8.0}) == 0.0


def test_one_storage_rule_for_runs_and_sweeps(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "cifar0"
    assert ray_storage("", run_dir, "cifar0") == (str(run_dir), "ray")  # run.dir/ray
    assert ray_storage("s3://bucket/prefix/", run_dir, "cifar0") == ("s3://bucket/prefix", "cifar0")
    monkeypatch.chdir(tmp_path)
    assert ray_storage("shared/ray", run_dir, "x") == (str(tmp_path / "shared" / "ray"), "x")
    assert ray_storage("file:///nfs/ray", run_dir, "x") == ("/nfs/ray", "x")
    assert experiment_path("s3://bucket/prefix", "sweep1") == "s3://bucket/prefix/sweep1"
    assert experiment_path(str(tmp_path), "ray") == str(tmp_path / "ray")


def test_storage_that_cannot_be_written_is_named_before_ray_starts(tmp_path):
    check_storage(str(tmp_path / "ray"))  # a folder: created
    assert (tmp_path / "ray").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="ray.storage_path=.*file/ray: cannot write there"):
        check_storage(str(tmp_path / "file" / "ray"))
    with pytest.raises(StorageError, match="not a location Ray can use"):
        check_storage("nosuchscheme://bucket/x")
    with serve_s3(), pytest.raises(StorageError, match="nobucket.*AWS_ENDPOINT_URL"):
        check_storage("s3://nobucket/runs")


def test_each_rank_uploads_the_checkpoint_files_it_wrote(tmp_path):
    names = [
        "capsdist.json",
        "model.safetensors",
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt",
    ]
    for name in names:
        (tmp_path / name).write_text(name)
    assert [p.name for p in written_by(tmp_path, 0)] == sorted(names[:4])
    assert [p.name for p in written_by(tmp_path, 1)] == [names[4]]
    assert [p.name for p in written_by(tmp_path, 12)] == [names[5]]
    assert written_by(tmp_path, 2) == []


def reported_checkpoint(folder, step: int, config: str = "seed: 0\n") -> ray.train.Checkpoint:
    """A folder as Ray Train's storage holds one (what every rank uploaded, merged)."""
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (folder / "config.yaml").write_text(config)
    (folder / "capsdist.json").write_text(json.dumps({"step": step}))
    return ray.train.Checkpoint.from_directory(str(folder))


def test_a_reported_checkpoint_is_restored_where_run_dir_lacks_it(tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = reported_checkpoint(tmp_path / "storage" / "step000000040", 40)
    # A save cut short here (no marker) is replaced by the reported copy.
    (run_dir / "checkpoints" / "step000000040").mkdir(parents=True)
    (run_dir / "checkpoints" / "step000000040" / "half_written.pt").write_text("")
    assert restore_checkpoint(run_dir, checkpoint) == 40
    restored = run_dir / "checkpoints" / "step000000040"
    assert sorted(p.name for p in restored.iterdir()) == [
        "capsdist.json",
        "mp_rank_00_model_states.pt",
    ]
    assert (run_dir / "config.yaml").read_text() == "seed: 0\n"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step000000040"]
    # Present and complete: nothing to do; run.dir's own config.yaml is never replaced.
    (run_dir / "config.yaml").write_text("seed: 1\n")
    assert restore_checkpoint(run_dir, checkpoint) is None
    assert (run_dir / "config.yaml").read_text() == "seed: 1\n"


def test_a_reported_folder_without_the_marker_is_refused(tmp_path):
    checkpoint = reported_checkpoint(tmp_path / "storage" / "step000000020", 20)
    (tmp_path / "storage" / "step000000020" / "capsdist.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete capsdist checkpoint"):
        restore_checkpoint(tmp_path / "run", checkpoint)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # nothing half-restored


def make_checkpoints(ckpt_dir: Path, marked: list[int], unmarked: list[int] = ()) -> None:
    for step in [*marked, *unmarked]:
        (ckpt_dir / f"step{step:09d}").mkdir(parents=True)
    for step in marked:
        (ckpt_dir / f"step{step:09d}" / "capsdist.json").write_text(json.dumps({"step": step}))


def test_shards_without_a_marker_beyond_keep_last_are_pruned(tmp_path):
    """Ranks > 0 on a node without run.dir's file system never see a marker: their old shards
    go, the newest keep_last stay, and complete checkpoints are rank 0's to prune."""
    make_checkpoints(tmp_path, marked=[10], unmarked=[20, 30, 40, 50])
    prune_unmarked(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step000000010",
        "step000000040",
        "step000000050",
    ]


def _agree(rank: int, port: int, root: str, reported: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            agree_on_resume_step(Path(root) / f"node{rank}", reported, 2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("shared", "expected"), [(True, [20, 40]), (False, [20])])
def test_ranks_resume_from_one_step_with_or_without_a_shared_file_system(
    tmp_path, shared, expected
):
    """Rank 0's node holds a complete checkpoint at 40 that was never reported (the last
    reported: 20). Seen by every rank (shared): kept, all resume at 40. Seen by rank 0 only:
    set aside, all resume at 20. Two real gloo processes, each with its node's run.dir."""
    make_checkpoints(tmp_path / "node0", marked=[20, 40])
    if shared:
        make_checkpoints(tmp_path / "node1", marked=[20, 40])
    else:
        make_checkpoints(tmp_path / "node1", marked=[20], unmarked=[40])
    mp.spawn(_agree, args=(free_port(), str(tmp_path), 20), nprocs=2, join=True)
    complete = sorted(int(p.parent.name[4:]) for p in (tmp_path / "node0").glob("step*/*.json"))
    assert complete == expected
    aside = [p.name for p in (tmp_path / "node0").iterdir() if p.name.startswith(".unreported")]
    assert len(aside) == (0 if shared else 1)


def test_a_relative_run_dir_under_ray_job_submit_is_refused(tmp_path):
    """`ray job submit --working-dir .` runs the driver in a temporary copy of the directory: a
    relative run.dir would be written there and vanish with the job."""
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}
    proc = subprocess.run(
        [sys.executable, "launch/ray_train.py", "-c", "configs/debug_cpu.yaml", "run.dir=runs/x"],
        cwd=ROOT,
        env=cli_env(RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps(job)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "ray_train: error: run.dir=runs/x is relative, and `ray job submit --working-dir` runs "
        "this job in a temporary copy of that directory: give run.dir as an absolute path on "
        "storage every node sees"
    ]
