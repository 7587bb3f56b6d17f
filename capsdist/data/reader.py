"""`ShardReader`: the batches one rank trains or evaluates on, read from the shards of a split.

Order of operations (DESIGN.md): shards of the split, sorted → split by node (`rank::world`) →
split by DataLoader worker (`worker::workers`, fixed, so epoch lengths are too) → per epoch, a
seeded shuffle of each worker's shard order → read + check + decode → seeded buffer shuffle →
batch. Then, in the trainer process, float conversion and the random shift. Every random choice
is seeded from (seed, rank, epoch[, worker or batch]), so a run and its resume see the same data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capsdist.data.augment import random_shift
from capsdist.data.meta import DataError, read_meta, split_shards
from capsdist.data.stream import ShardTask, batch, decode, mix_seed, read_shard, shuffle

RawBatch = tuple[torch.Tensor, torch.Tensor]  # uint8 (B, H, W, C) images, int64 labels


class Batch(NamedTuple):
    """What the reader yields: ready for the model, on the reader's device."""

    images: torch.Tensor
    """(B, C, H, W) float32 in [0, 1], augmented when training."""
    labels: torch.Tensor
    """(B,) int64, or (B, T) for T targets."""
    recon_targets: torch.Tensor | None = None
    """What the decoder should reproduce, shaped like its output; None = `images` itself."""


@dataclass(frozen=True)
class _EpochPlan:
    """Everything a worker needs to produce its batches of one epoch (picklable)."""

    worker_tasks: tuple[tuple[ShardTask, ...], ...]  # shards of each worker, in sorted order
    image_shape: tuple[int, int, int]
    num_classes: int
    num_targets: int
    batch_size: int
    train: bool
    shuffle_buffer: int
    seed: int
    rank: int
    epoch: int


class _EpochStream(IterableDataset):
    """The uint8 batches of one epoch; under a DataLoader, each worker streams its own shards."""

    def __init__(self, plan: _EpochPlan):
        self.plan = plan

    def __iter__(self) -> Iterator[RawBatch]:
        plan = self.plan
        info = get_worker_info()
        worker = 0 if info is None else info.id
        tasks = list(plan.worker_tasks[worker])
        rng = random.Random(mix_seed(plan.seed, plan.rank, plan.epoch, worker))
        if plan.train:
            rng.shuffle(tasks)
        samples = (sample for task in tasks for sample in read_shard(task))
        samples = decode(samples, math.prod(plan.image_shape), plan.num_classes, plan.num_targets)
        if plan.train and plan.shuffle_buffer > 1:
            samples = shuffle(samples, plan.shuffle_buffer, rng)
        return batch(samples, plan.batch_size, plan.image_shape, drop_last=plan.train)


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
    """Batches of one split for one rank: images float32 (B, C, H, W) in [0, 1], labels int64.

    Labels are (B,) for one target and (B, 2) for two. With `train=True`: each epoch shuffles
    shard order and samples (buffer of `shuffle_buffer`), shifts images by ±`shift_pixels` and
    drops the last partial batch, all deterministic in (seed, rank, epoch) for a given
    `num_workers`. With `train=False`: fixed order, no augmentation, last batch kept.
    `max_examples > 0` keeps only the first `max_examples` samples of this rank's shards.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        train: bool = True,
        shift_pixels: int = 0,
        shuffle_buffer: int = 2000,
        num_workers: int = 0,
        max_examples: int = 0,
        device: torch.device | str = "cpu",
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got "
                f"{batch_size}, {rank}, {world_size}"
            )
        if min(shift_pixels, shuffle_buffer, num_workers, max_examples) < 0:
            raise ValueError("shift_pixels, shuffle_buffer, num_workers, max_examples must be >= 0")
        self.root = Path(root)
        self.split = split
        self.meta = read_meta(self.root)
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.shift_pixels = shift_pixels if train else 0
        self.image_shape = tuple(self.meta["image_shape"])
        self.device = torch.device(device)

        all_shards = split_shards(self.meta, split, self.root)
        self.shards = all_shards[rank::world_size]
        if not self.shards:
            # TODO(resampling): DESIGN.md wants resampled shards when shards < ranks x workers.
            raise DataError(
                f"{self.root / 'meta.json'}: split {split!r} has {len(all_shards)} shard(s), too "
                f"few for {world_size} ranks (rank {rank} gets none); rewrite it with a smaller "
                f"--samples-per-shard"
            )
        tasks = self._tasks(max_examples)
        self.num_examples = sum(t.limit for t in tasks)
        # Workers beyond the number of shards would read nothing: do not start them.
        self.num_workers = min(num_workers, len(tasks))
        groups = max(self.num_workers, 1)
        self._worker_tasks = tuple(tuple(tasks[w::groups]) for w in range(groups))
        self._shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = sum(self._num_batches(ts) for ts in self._worker_tasks)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.root}: rank {rank} reads {self.num_examples} {split!r} samples, fewer "
                f"than one batch of {batch_size} per reader; lower the batch size"
            )

    def _tasks(self, max_examples: int) -> list[ShardTask]:
        """This rank's shards with the samples to take from each (all, unless max_examples)."""
        tasks, left = [], max_examples if max_examples > 0 else math.inf
        for name in self.shards:
            path = self.root / name
            if not path.is_file():
                raise DataError(f"{path}: shard listed in meta.json is missing")
            size = self.meta["shard_sizes"][name]
            take = int(min(size, left))
            if take > 0:
                tasks.append(ShardTask(str(path), size, take))
            left -= take
        return tasks

    def _num_batches(self, tasks: tuple[ShardTask, ...]) -> int:
        n = sum(t.limit for t in tasks)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _raw_batches(self, epoch: int) -> Iterator[RawBatch]:
        plan = _EpochPlan(
            worker_tasks=self._worker_tasks,
            image_shape=self.image_shape,
            num_classes=self.meta["num_classes"],
            num_targets=self.meta["num_targets"],
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

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, index: int) -> Batch:
        """uint8 (B, H, W, C) → float32 (B, C, H, W) in [0, 1] on the device, shifted when
        training. Moved as uint8 (4x fewer bytes) and augmented there (on the GPU if any)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        x = x.div_(255)
        if self.shift_pixels:
            # Seeded per batch, so that resuming mid-epoch gives the very same shifts.
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, epoch, index))
            x = random_shift(x, self.shift_pixels, gen)
        return Batch(x, labels)

    def _epoch(self, epoch: int, skip: int) -> Iterator[Batch]:
        for index, (images, labels) in enumerate(self._raw_batches(epoch)):
            if index >= skip:  # skipped batches are read but not converted
                yield self._finish(images, labels, epoch, index)

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
