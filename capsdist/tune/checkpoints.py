"""run.dir checkpoints as Ray Train checkpoints (`LAUNCHER=ray`).

Every complete checkpoint of run.dir is reported to Ray Train, which copies it to its storage
(ray.storage_path, see storage.py); after a worker dies, Ray Train restarts the worker group and
hands the last reported one back. Ray merges what every worker uploads into one folder per
checkpoint, so each rank uploads the files it wrote itself, which is what a node without run.dir's
file system has: its ZeRO optimizer shard. Rank 0 uploads the rest (DeepSpeed's model states, the
exported weights, the marker) and run.dir/config.yaml, so that a restore also brings back which
run the checkpoint belongs to (the loop then refuses a run.dir holding another run's).

On a (re)start, before the loop, `prepare_run_dir` puts the reported checkpoint into run.dir on
every node that lacks it; the loop's own resume then loads it like any other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import ray.train
import torch.distributed as dist

from capsdist.run_dir import (
    CHECKPOINTS,
    CONFIG,
    MARKER,
    CheckpointError,
    complete_checkpoints,
)
from capsdist.train import on_every_rank

# DeepSpeed names the optimizer shard of data-parallel rank r `zero_pp_rank_{r}_mp_rank_00_...`
# (`bf16_zero_pp_rank_...` under bf16); rank r wrote it. Rank 0 writes every other file.
_ZERO_SHARD = re.compile(r"zero_pp_rank_(\d+)_")
_UPLOAD = ".upload-"  # staging folders in run.dir/checkpoints; `step*` globs never match them
_RESTORE = ".restore-"
_UNREPORTED = ".unreported-"


def written_by(folder: Path, rank: int) -> list[Path]:
    """The files of a checkpoint folder that `rank` wrote."""
    owned = []
    for path in sorted(folder.iterdir()):
        shard = _ZERO_SHARD.search(path.name)
        if (int(shard.group(1)) if shard else 0) == rank:
            owned.append(path)
    return owned


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)  # same file system: no copy of a large optimizer shard
    except OSError:
        shutil.copy2(src, dst)


@on_every_rank  # ray.train.report is a barrier that every worker must reach
class CheckpointReporter:
    """Training callback: after each complete checkpoint, report it to Ray Train with the metrics
    of the last log line."""

    def __init__(self, run_dir: str | Path, rank: int, keep_last: int):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.keep_last = keep_last
        self.metrics: dict[str, float] = {}

    def __call__(self, step: int, metrics: dict[str, float], model) -> None:
        self.metrics = dict(metrics)  # attached to the next checkpoint's report

    def on_checkpoint(self, step: int, folder: Path) -> None:
        staging = folder.parent / f"{_UPLOAD}{folder.name}-rank{self.rank}"
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed worker
        staging.mkdir()
        try:
            files = written_by(folder, self.rank)
            for path in files:
                _link_or_copy(path, staging / path.name)
            if self.rank == 0 and (self.run_dir / CONFIG).exists():
                shutil.copy2(self.run_dir / CONFIG, staging / CONFIG)
            checkpoint = ray.train.Checkpoint.from_directory(str(staging)) if files else None
            ray.train.report(
                {**self.metrics, "step": step},
                checkpoint=checkpoint,
                checkpoint_dir_name=folder.name,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        prune_unmarked(folder.parent, self.keep_last)


def prune_unmarked(ckpt_dir: Path, keep_last: int) -> None:
    """Without a shared file system the marker is written on rank 0's node only, so the loop's
    pruning never reaches the other nodes' shards: remove unmarked checkpoint folders beyond the
    newest `keep_last`. (On a shared file system every folder here has its marker by now, the one
    just saved included, as save_checkpoint ends in a barrier: nothing is removed.)"""
    folders = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
    for old in folders[:-keep_last]:
        if not (old / MARKER).exists():
            shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(run_dir: Path, checkpoint: ray.train.Checkpoint) -> int | None:
    """Copy Ray Train's `checkpoint` into run_dir/checkpoints (and config.yaml into run_dir if
    missing) unless run.dir already has it complete; atomically: downloaded beside, then renamed
    into place. Returns its step when it was restored, else None."""
    ckpt_dir = run_dir / CHECKPOINTS
    target = ckpt_dir / Path(checkpoint.path).name
    if (target / MARKER).exists():
        return None
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_RESTORE}{target.name}-", dir=ckpt_dir))
    try:
        checkpoint.to_directory(str(staging))
        if not (staging / MARKER).exists():
            raise CheckpointError(
                f"Ray Train's checkpoint {checkpoint.path} has no {MARKER}: not a complete "
                "capsdist checkpoint; is ray.storage_path shared with another program's runs?"
            )
        if (staging / CONFIG).exists():
            if (run_dir / CONFIG).exists():
                (staging / CONFIG).unlink()
            else:
                os.replace(staging / CONFIG, run_dir / CONFIG)
        if target.exists():  # a save cut short here (no marker): the reported copy replaces it
            aside = ckpt_dir / f"{_UNREPORTED}{target.name}-{os.getpid()}"
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return int(json.loads((target / MARKER).read_text())["step"])


def prepare_run_dir(run_dir: Path, rank: int, world_size: int) -> int | None:
    """Before the loop, in every Ray Train worker (whose process group Ray has set up): restore
    the last reported checkpoint where run.dir lacks it, one rank at a time (ranks sharing a
    file system then find it there), and make every rank resume from the same step. Returns the
    step restored on this rank, or None."""
    checkpoint = ray.train.get_checkpoint()
    if not dist.is_initialized():  # one worker: nothing to coordinate
        return restore_checkpoint(run_dir, checkpoint) if checkpoint else None
    restored = None
    for turn in range(world_size):
        if turn == rank and checkpoint is not None:
            restored = restore_checkpoint(run_dir, checkpoint)
        dist.barrier()
    agree_on_resume_step(run_dir / CHECKPOINTS, _step_of(checkpoint), world_size)
    return restored


def _step_of(checkpoint: ray.train.Checkpoint | None) -> int:
    if checkpoint is None:
        return 0
    digits = re.search(r"(\d+)$", Path(checkpoint.path).name)
    return int(digits.group(1)) if digits else 0


def agree_on_resume_step(ckpt_dir: Path, reported: int, world_size: int) -> None:
    """Each rank resumes from the newest complete checkpoint it sees. On a shared file system
    they all see the same; without one, rank 0's node may hold a complete checkpoint newer than
    the last reported one (a worker died between the two), which the other nodes lack: then every
    rank sets aside what is newer than the reported checkpoint and all resume from that."""
    newest = complete_checkpoints(ckpt_dir)
    seen = [None] * world_size
    dist.all_gather_object(seen, newest[-1][0] if newest else 0)
    if len(set(seen)) == 1:
        return
    for step, folder in newest:
        if step > reported:
            aside = ckpt_dir / f"{_UNREPORTED}{folder.name}-{os.getpid()}"
            os.replace(folder, aside)
            warnings.warn(
                f"{folder} was never reported to Ray Train and the other nodes lack it: moved "
                f"to {aside}; resuming from step {reported} (delete it when no longer needed)",
                stacklevel=2,
            )
