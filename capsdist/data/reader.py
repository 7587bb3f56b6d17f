"""`ShardReader`: the batches one rank trains or evaluates on, read from the shards of a split.

Order of operations (DESIGN.md): shards of the split, sorted → split by node (`rank::world`) →
split by DataLoader worker (`worker::workers`, fixed, so epoch lengths are too) → per epoch, a
seeded shuffle of each worker's shard order → read + check + decode → seeded buffer shuffle →
batch. Then, in the trainer process on its device, float conversion and augmentation. Every
random choice is seeded from (seed, rank, epoch[, worker or batch]), so a run and its resume see
the same data.

Resampled shards: when a training split has fewer shards than ranks × workers, an even split
would leave readers without data. Then every reader instead draws whole shards at random (with
replacement, seeded by seed, rank, epoch, worker) until it has its fixed share of the split's
samples: epochs keep one length on every rank, at the price of some samples seen twice.

`read_split_arrays` reads a whole split as uint8 arrays instead, through the same checks: what
tools that derive one data set from another (MultiMNIST from MNIST) need.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from capsdist.data.augment import Augmentation
from capsdist.data.epoch import EpochPlan, epoch_batches
from capsdist.data.meta import META_NAME, shard_root, split_shards
from capsdist.data.source import ShardTask, prefetched, shard_tasks
from capsdist.data.stream import (
    RawBatch,
    SampleFormat,
    Skips,
    batch,
    decode,
    mix_seed,
    read_shard,
)
from capsdist.data.urls import DataError, expand_shards, join, local


class Batch(NamedTuple):
    """What the reader yields: ready for the model, on the reader's device."""

    images: torch.Tensor
    """(B, C, H, W) float32 in [0, 1] (standardised if data.standardize), augmented in training."""
    labels: torch.Tensor
    """(B,) int64, or (B, T) for T targets."""
    recon_targets: torch.Tensor | None = None
    """What the decoder should reproduce, shaped like its output; None = `images` itself."""


def read_split_arrays(
    root: str | Path, split: str, meta: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of `split` in shard order, as uint8 images (N, H, W, C) and int64 labels
    (N,) or (N, T), each checked as the reader checks it (DataError on a bad one); `meta` is
    `read_meta(root)`. Reconstruction targets are not read."""
    fmt = SampleFormat.from_meta(meta, "raise", recon=False)
    tasks = shard_tasks(shard_root(meta, root), meta, split_shards(meta, split, root))
    samples = decode((sample for shard in prefetched(tasks) for sample in read_shard(shard)), fmt)
    chunks = list(batch(samples, 10_000, fmt, drop_last=False))
    images = np.concatenate([c.images.numpy() for c in chunks])
    labels = np.concatenate([c.labels.numpy() for c in chunks])
    return images, labels


class ShardReader:
    """Batches of one split for one rank: images float32 (B, C, H, W), labels int64.

    `meta` is `read_meta(root)`, read once by the caller. Labels are (B,) for one target and
    (B, 2) for two. With `train=True`: each epoch shuffles shard order and samples (buffer of
    `shuffle_buffer`), applies `augment` (None: no augmentation; `build_augmentation` makes it
    from the config, which owns every default) and drops the last partial batch, all
    deterministic in (seed, rank, epoch) for a given `num_workers`. With `train=False`: fixed
    order, only the deterministic part of `augment` (centre crop, standardisation), last batch
    kept. `max_examples > 0` keeps only the first `max_examples` samples of this rank's shards.
    `on_error="skip"` leaves bad samples out and counts them in `num_skipped` instead of raising
    DataError, saying why for the first few in the first epoch read; it still raises after
    MAX_CONSECUTIVE_SKIPS bad samples in a row, or when an epoch is left without a batch.
    `root` is a folder or URL (urls.py); `shards`, a brace pattern or `pipe:` commands, reads
    the split's shards from elsewhere (data.shards); `cache_dir` keeps remote shards on this node.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        meta: dict[str, Any],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        train: bool = True,
        shuffle_buffer: int = 2000,
        num_workers: int = 0,
        max_examples: int = 0,
        device: torch.device | str = "cpu",
        augment: Augmentation | None = None,
        on_error: str = "raise",
        shards: str = "",
        cache_dir: str = "",
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got "
                f"{batch_size}, {rank}, {world_size}"
            )
        if min(shuffle_buffer, num_workers, max_examples) < 0:
            raise ValueError("shuffle_buffer, num_workers, max_examples must be >= 0")
        self.root = local(root)
        self.split = split
        self.meta = meta
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.augment = augment if augment is not None else Augmentation()  # no augmentation
        self.image_shape = tuple(meta["image_shape"])
        self.device = torch.device(device)
        self.num_skipped = 0
        """Samples left out so far under on_error=skip (all epochs read by this reader)."""
        self._skips_reported = False
        self._fmt = SampleFormat.from_meta(meta, on_error)
        Skips(on_error)  # validates the value here rather than in a worker

        all_shards = split_shards(meta, split, self.root)
        if shards:
            located = expand_shards(shards, all_shards, join(self.root, META_NAME))
            all_shards = [name for name, _ in located]
        else:
            where = shard_root(meta, self.root)
            located = [(name, join(where, name)) for name in all_shards]
        self._urls = dict(located)
        self._cache_dir = cache_dir
        readers = world_size * max(num_workers, 1)
        self.resampled = train and len(all_shards) < readers
        if self.resampled:
            self._plan_resampled(all_shards, num_workers, max_examples)
        else:
            self._plan_split(all_shards, num_workers, max_examples)
        self._shuffle_buffer = shuffle_buffer
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.root}: rank {rank} reads {self.num_examples} {split!r} samples, fewer "
                f"than one batch of {batch_size} per reader; lower the batch size"
            )

    def _plan_split(self, all_shards: list[str], num_workers: int, max_examples: int) -> None:
        """Disjoint shards per rank (`rank::world`), then per worker."""
        self.shards = all_shards[self.rank :: self.world_size]
        if not self.shards:
            raise DataError(
                f"{join(self.root, META_NAME)}: split {self.split!r} has {len(all_shards)} "
                f"shard(s), too few for {self.world_size} ranks (rank {self.rank} gets none); "
                f"rewrite it with a smaller --samples-per-shard"
            )
        tasks = self._tasks(self.shards, max_examples)
        self.num_examples = sum(t.limit for t in tasks)
        # Workers beyond the number of shards would read nothing: do not start them.
        self.num_workers = min(num_workers, len(tasks))
        groups = max(self.num_workers, 1)
        self._worker_tasks = tuple(tuple(tasks[w::groups]) for w in range(groups))
        self._quota = None
        self.batches_per_epoch = sum(
            self._num_batches(sum(t.limit for t in ts)) for ts in self._worker_tasks
        )

    def _plan_resampled(self, all_shards: list[str], num_workers: int, max_examples: int) -> None:
        """Every rank and worker draws from all shards; each gets an equal, fixed share."""
        self.shards = list(all_shards)
        pool = tuple(self._tasks(all_shards, max_examples))
        total = sum(t.limit for t in pool)
        self.num_workers = num_workers
        groups = max(num_workers, 1)
        per_rank = total // self.world_size
        self._quota = tuple(per_rank // groups + (w < per_rank % groups) for w in range(groups))
        self._worker_tasks = (pool,)
        self.num_examples = per_rank
        self.batches_per_epoch = sum(self._num_batches(q) for q in self._quota)

    def _tasks(self, names: list[str], max_examples: int) -> list[ShardTask]:
        urls = [self._urls[name] for name in names]
        return shard_tasks(
            self.root, self.meta, names, max_examples, urls=urls, cache_dir=self._cache_dir
        )

    def _num_batches(self, n: int) -> int:
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _raw_batches(self, epoch: int) -> Iterator[RawBatch]:
        plan = EpochPlan(
            worker_tasks=self._worker_tasks,
            resample_quota=self._quota,
            fmt=self._fmt,
            batch_size=self.batch_size,
            train=self.train,
            shuffle_buffer=self._shuffle_buffer,
            seed=self.seed,
            rank=self.rank,
            epoch=epoch,
            report_skips=not self._skips_reported,
        )
        self._skips_reported = True
        return epoch_batches(plan, self.num_workers)

    def _finish(self, raw: RawBatch, epoch: int, index: int) -> Batch:
        """uint8 (B, H, W, C) → float32 (B, C, H, W) on the device, augmented. Moved as uint8
        (4x fewer bytes) and augmented there (on the GPU if any)."""
        images = raw.images.to(self.device, non_blocking=True)
        labels = raw.labels.to(self.device, non_blocking=True)
        recon = None if raw.recon is None else raw.recon.to(self.device, non_blocking=True)
        gen = None
        if self.train and self.augment.random:
            # Seeded per batch, so that resuming mid-epoch gives the very same augmentation.
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, epoch, index))
        x, recon_targets = self.augment(images, recon, self.train, gen)
        return Batch(x, labels, recon_targets)

    def _epoch(self, epoch: int, skip: int) -> Iterator[Batch]:
        index, skipped = 0, self.num_skipped
        for raw in self._raw_batches(epoch):
            self.num_skipped += raw.skipped
            if raw.images is None:
                continue  # only carried the count of skipped samples
            if index >= skip:  # skipped batches are read but not converted
                yield self._finish(raw, epoch, index)
            index += 1
        if index == 0:
            # Every epoch would be the same: without this, `batches()` loops forever, silently.
            raise DataError(
                f"{self.root}: no {self.split!r} batch of {self.batch_size} in epoch {epoch}: "
                f"{self.num_skipped - skipped} samples skipped as bad (data.on_error=skip); "
                f"the data is damaged, rewrite it"
            )

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The `batches_per_epoch` batches of epoch `epoch` for this rank."""
        return self._epoch(epoch, 0)

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Batches of epoch 0, 1, 2, ... without end, skipping the first `start` overall.

        Whole epochs are jumped without reading them; only the rest of a partial epoch is read
        through, so `batches(k)` yields exactly what `batches(0)` yields after k batches.
        """
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            yield from self._epoch(epoch, skip)
            epoch, skip = epoch + 1, 0
