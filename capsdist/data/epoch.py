"""One epoch of one rank's reader: the plan each reader process follows, and the DataLoader
whose workers follow it (reader.py decides the plan; this file carries it out).

Each worker reads its own shards (or, when resampling, draws its own), shuffles them seeded by
(seed, rank, epoch, worker), and hands over uint8 batches; remote shards are fetched one ahead
of the parser (source.py), so a worker holds at most two shards' bytes at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capsdist.data.source import ShardTask, prefetched
from capsdist.data.stream import (
    MAX_SKIP_MESSAGES,
    RawBatch,
    SampleFormat,
    Skips,
    batch,
    decode,
    mix_seed,
    read_shard,
    shuffle,
)
from capsdist.data.urls import DataError


@dataclass(frozen=True)
class EpochPlan:
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
    report_skips: bool  # say why samples are skipped: only in the first epoch (the same each time)


def _resampled(pool: tuple[ShardTask, ...], quota: int, rng: random.Random) -> list[ShardTask]:
    """Whole shards drawn with replacement until `quota` samples; the last one cut short."""
    tasks = []
    while quota > 0:
        shard = pool[rng.randrange(len(pool))]
        take = min(shard.limit, quota)
        tasks.append(replace(shard, limit=take))
        quota -= take
    return tasks


class EpochStream(IterableDataset):
    """The uint8 batches of one epoch; under a DataLoader, each worker streams its own shards."""

    def __init__(self, plan: EpochPlan):
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
        skips = Skips(plan.fmt.on_error, MAX_SKIP_MESSAGES if plan.report_skips else 0)
        samples = (sample for shard in prefetched(tasks) for sample in read_shard(shard, skips))
        samples = decode(samples, plan.fmt, skips)
        if plan.train and plan.shuffle_buffer > 1:
            samples = shuffle(samples, plan.shuffle_buffer, rng)
        return batch(samples, plan.batch_size, plan.fmt, drop_last=plan.train, skips=skips)


def from_workers(loader: DataLoader) -> Iterator[RawBatch]:
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


def epoch_batches(plan: EpochPlan, num_workers: int) -> Iterator[RawBatch]:
    """The uint8 batches of `plan`'s epoch: read here, or by `num_workers` DataLoader workers."""
    stream = EpochStream(plan)
    if num_workers == 0:
        return iter(stream)
    # batch_size=None: batches are built inside the workers' pipelines.
    return from_workers(DataLoader(stream, batch_size=None, num_workers=num_workers))
