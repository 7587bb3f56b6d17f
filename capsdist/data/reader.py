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
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capsdist.data.augment import Augmentation
from capsdist.data.meta import DataError, split_shards
from capsdist.data.stream import (
    RawBatch,
    SampleFormat,
    ShardTask,
    Skips,
    batch,
    decode,
    mix_seed,
    read_shard,
    shard_tasks,
    shuffle,
)


class Batch(NamedTuple):
    """What the reader yields: ready for the model, on the reader's device."""

    images: torch.Tensor
    """(B, C, H, W) float32 in [0, 1] (standardised if data.standardize), augmented in training."""
    labels: torch.Tensor
    """(B,) int64, or (B, T) for T targets."""
    recon_targets: torch.Tensor | None = None
    """What the decoder should reproduce, shaped like its output; None = `images` itself."""


@dataclass(frozen=True)
class _EpochPlan:
    """Everything a worker needs to produce its batches of one epoch (picklable)."""

    worker_tasks: tuple[tuple[ShardTask, ...], ...]  # shards of each worker, in sorted order
    resample_quota: tuple[int, ...] | None  # resampled: samples each worker draws
    fmt: SampleFormat
    batch_size: int
    train: bool
    shuffle_buffer: int
    seed: int
    rank: int
    epoch: int


def read_split_arrays(
    root: str | Path, split: str, meta: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of `split` in shard order, as uint8 images (N, H, W, C) and int64 labels
    (N,) or (N, T), each checked as the reader checks it (DataError on a bad one); `meta` is
    `read_meta(root)`. Reconstruction targets are not read."""
    root = Path(root)
    fmt = SampleFormat.from_meta(meta, "raise", recon=False)
    tasks = shard_tasks(root, meta, split_shards(meta, split, root))
    samples = decode((sample for task in tasks for sample in read_shard(task)), fmt)
    chunks = list(batch(samples, 10_000, fmt, drop_last=False))
    images = np.concatenate([c.images.numpy() for c in chunks])
    labels = np.concatenate([c.labels.numpy() for c in chunks])
    return images, labels


def _resampled(pool: tuple[ShardTask, ...], quota: int, rng: random.Random) -> list[ShardTask]:
    """Whole shards drawn with replacement until `quota` samples; the last one cut short."""
    tasks = []
    while quota > 0:
        shard = pool[rng.randrange(len(pool))]
        take = min(shard.limit, quota)
        tasks.append(ShardTask(shard.path, shard.expected, take))
        quota -= take
    return tasks


class _EpochStream(IterableDataset):
    """The uint8 batches of one epoch; under a DataLoader, each worker streams its own shards."""

    def __init__(self, plan: _EpochPlan):
        self.plan = plan

    def __iter__(self) -> Iterator[RawBatch]:
        plan = self.plan
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = random.Random(mix_seed(plan.seed, plan.rank, plan.epoch, worker))
        if plan.resample_quota is not None:
            tasks = _resampled(plan.worker_tasks[0], plan.resample_quota[worker], rng)
        else:
            tasks = list(plan.worker_tasks[worker])
            if plan.train:
                rng.shuffle(tasks)
        skips = Skips(plan.fmt.on_error)
        samples = (sample for task in tasks for sample in read_shard(task, skips))
        samples = decode(samples, plan.fmt, skips)
        if plan.train and plan.shuffle_buffer > 1:
            samples = shuffle(samples, plan.shuffle_buffer, rng)
        return batch(samples, plan.batch_size, plan.fmt, drop_last=plan.train, skips=skips)


def _from_workers(loader: DataLoader) -> Iterator[RawBatch]:
    """Iterate `loader`; a worker's DataError comes back as the one-line original message.

    DataLoader re-raises a worker's exception with the worker's traceback inside the message;
    the CLI prints errors as one line, and the last line of that text is the original message.
    """
    iterator = iter(loader)
    message = None
    try:
        yield from iterator
    except DataError as exn:
        last = str(exn).strip().splitlines()[-1:]
        marker = f"{DataError.__name__}: "
        if not last or marker not in last[0]:
            raise
        message = last[0].split(marker, 1)[1]
    finally:
        # Workaround: after an error or an early stop the iterator is only freed by the cyclic
        # GC, whose shutdown then waits ~5 s per worker (measured, torch 2.13); stop them now.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    if message is not None:
        raise DataError(message)


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
    DataError.
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
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got "
                f"{batch_size}, {rank}, {world_size}"
            )
        if min(shuffle_buffer, num_workers, max_examples) < 0:
            raise ValueError("shuffle_buffer, num_workers, max_examples must be >= 0")
        self.root = Path(root)
        self.split = split
        self.meta = meta
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.augment = augment if augment is not None else Augmentation()  # no augmentation
        self.image_shape = tuple(meta["image_shape"])
        self.device = torch.device(device)
        self.num_skipped = 0
        """Samples left out so far under on_error=skip (all epochs read by this reader)."""
        self._fmt = SampleFormat.from_meta(meta, on_error)
        Skips(on_error)  # validates the value here rather than in a worker

        all_shards = split_shards(meta, split, self.root)
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
                f"{self.root / 'meta.json'}: split {self.split!r} has {len(all_shards)} "
                f"shard(s), too few for {self.world_size} ranks (rank {self.rank} gets none); "
                f"rewrite it with a smaller --samples-per-shard"
            )
        tasks = shard_tasks(self.root, self.meta, self.shards, max_examples)
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
        pool = tuple(shard_tasks(self.root, self.meta, all_shards, max_examples))
        total = sum(t.limit for t in pool)
        self.num_workers = num_workers
        groups = max(num_workers, 1)
        per_rank = total // self.world_size
        self._quota = tuple(per_rank // groups + (w < per_rank % groups) for w in range(groups))
        self._worker_tasks = (pool,)
        self.num_examples = per_rank
        self.batches_per_epoch = sum(self._num_batches(q) for q in self._quota)

    def _num_batches(self, n: int) -> int:
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _raw_batches(self, epoch: int) -> Iterator[RawBatch]:
        plan = _EpochPlan(
            worker_tasks=self._worker_tasks,
            resample_quota=self._quota,
            fmt=self._fmt,
            batch_size=self.batch_size,
            train=self.train,
            shuffle_buffer=self._shuffle_buffer,
            seed=self.seed,
            rank=self.rank,
            epoch=epoch,
        )
        stream = _EpochStream(plan)
        if self.num_workers == 0:
            return iter(stream)
        # batch_size=None: batches are built inside the workers' pipelines.
        return _from_workers(DataLoader(stream, batch_size=None, num_workers=self.num_workers))

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
        index = 0
        for raw in self._raw_batches(epoch):
            self.num_skipped += raw.skipped
            if raw.images is None:
                continue  # only carried the count of skipped samples
            if index >= skip:  # skipped batches are read but not converted
                yield self._finish(raw, epoch, index)
            index += 1

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
