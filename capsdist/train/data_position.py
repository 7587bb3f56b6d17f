"""Where a run is in its data, carried across a change of world size, micro-batch or reader
workers, so that no sample is repeated or skipped beyond one global batch.

Each rank reads its own share of the shards, in an order seeded by (seed, rank, epoch, worker):
a rank's stream (`ShardReader.batches`) depends on the data layout (ranks, micro-batch,
workers). With the same layout a resume simply skips the batches already trained on. With
another layout the rest of the epoch in progress exists only in the old layout's streams, so
the new job reads those first:

    old layout, at the switch step s:  rank j is k_j batches into its epoch e_j
    the replay S = the rest of each old rank's epoch, one segment per old rank, concatenated
    K = len(S) // global batch steps read S, split rank-major: new rank r takes the r-th of
        the new world size's equal blocks (a tail shorter than one global batch is left out)
    then each new rank starts its own stream at the next epoch, at step s + K

Every rank reads only its block's segments; each old stream is rebuilt exactly (same seeds,
same workers, same augmentation) by a reader for that old rank. A checkpoint taken during a
replay records it; a second change of world size mid-replay splits what remains of it again.
The position is stored in the checkpoint marker (capsdist.json) as `DataPosition.to_json()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch

from capsdist.config import Config
from capsdist.data import Batch, ShardReader, build_reader


@dataclass(frozen=True)
class DataLayout:
    """What a rank's stream of training batches depends on, besides the seed and the data."""

    world_size: int
    micro_batch: int
    num_workers: int

    def accumulation(self, global_batch: int) -> int:
        return global_batch // (self.world_size * self.micro_batch)

    def describe(self) -> str:
        ranks, workers = self.world_size, self.num_workers
        return f"{ranks} rank(s) × micro-batch {self.micro_batch}, {workers} reader workers"


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of epoch `epoch` of rank `rank`'s stream in some layout."""

    rank: int
    epoch: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Replay:
    """Steps [first_step, DataPosition.start_step) read the concatenated `segments` of `layout`'s
    streams, split rank-major between `world_size` ranks."""

    layout: DataLayout
    world_size: int
    first_step: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class DataPosition:
    """From `start_step` on, each rank of `layout` reads its own stream from batch 0 of epoch
    `start_epoch`; before it, `replay` (if any) is read."""

    layout: DataLayout
    start_step: int = 0
    start_epoch: int = 0
    replay: Replay | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DataPosition:
        replay = data.get("replay")
        if replay is not None:
            replay = Replay(
                DataLayout(**replay["layout"]),
                replay["world_size"],
                replay["first_step"],
                tuple(Segment(**s) for s in replay["segments"]),
            )
        return cls(DataLayout(**data["layout"]), data["start_step"], data["start_epoch"], replay)


EpochLength = Callable[[DataLayout, int], int]  # (layout, rank) → batches per epoch


def plan_resume(
    saved: DataPosition, step: int, now: DataLayout, global_batch: int, epoch_length: EpochLength
) -> tuple[DataPosition, str]:
    """The position a job with layout `now` continues from at `step`, given the one saved with
    the checkpoint; and a note on what it does about a changed layout ('' when nothing)."""
    replay = saved.replay
    if replay is not None and step < saved.start_step:  # a replay is in progress
        if replay.world_size == now.world_size:
            return replace(saved, layout=now), ""
        rest = _remaining(replay, step, saved.start_step, global_batch)
        position = _replaying(rest, replay.layout, step, saved.start_epoch, now, global_batch)
        return position, _note(position, global_batch)
    if saved.layout == now:
        return saved, ""
    segments, next_epoch = _epoch_rests(saved, step, global_batch, epoch_length)
    position = _replaying(segments, saved.layout, step, next_epoch, now, global_batch)
    return position, _note(position, global_batch, left_out=_left_out(segments, global_batch))


def _epoch_rests(
    saved: DataPosition, step: int, global_batch: int, epoch_length: EpochLength
) -> tuple[tuple[Segment, ...], int]:
    """The rest of the epoch each rank of saved.layout is in at `step`, and the epoch the new
    layout starts at (after every epoch any old rank has begun)."""
    layout = saved.layout
    done = (step - saved.start_step) * layout.accumulation(global_batch)
    segments, next_epoch = [], saved.start_epoch
    for rank in range(layout.world_size):
        per_epoch = epoch_length(layout, rank)
        epoch, batch = divmod(saved.start_epoch * per_epoch + done, per_epoch)
        if batch:
            micro = layout.micro_batch
            segments.append(Segment(rank, epoch, batch * micro, per_epoch * micro))
        next_epoch = max(next_epoch, epoch + (batch > 0))
    return tuple(segments), next_epoch


def _replaying(
    segments: tuple[Segment, ...],
    source: DataLayout,
    step: int,
    next_epoch: int,
    now: DataLayout,
    global_batch: int,
) -> DataPosition:
    steps = sum(s.size for s in segments) // global_batch
    if steps == 0:
        return DataPosition(now, step, next_epoch)
    return DataPosition(
        now, step + steps, next_epoch, Replay(source, now.world_size, step, segments)
    )


def _left_out(segments: tuple[Segment, ...], global_batch: int) -> int:
    return sum(s.size for s in segments) % global_batch


def _note(position: DataPosition, global_batch: int, left_out: int = 0) -> str:
    replay = position.replay
    tail = f"; {left_out} sample(s) of it (less than one global batch) left out" if left_out else ""
    if replay is None:
        return f"data: new layout starts at epoch {position.start_epoch}{tail}"
    steps = position.start_step - replay.first_step
    return (
        f"data: steps {replay.first_step}-{position.start_step - 1} read the rest of the epoch "
        f"in progress as {replay.layout.describe()} would have ({steps * global_batch} samples), "
        f"then epoch {position.start_epoch} starts{tail}"
    )


def _block(replay: Replay, rank: int, steps: int, global_batch: int) -> tuple[int, int]:
    """Rank `rank`'s range of the replay's concatenated samples."""
    size = steps * global_batch // replay.world_size
    return rank * size, (rank + 1) * size


def _slice(segments: tuple[Segment, ...], start: int, stop: int) -> list[Segment]:
    """The parts of the concatenated `segments` in [start, stop)."""
    out, offset = [], 0
    for s in segments:
        lo, hi = max(start, offset), min(stop, offset + s.size)
        if lo < hi:
            out.append(Segment(s.rank, s.epoch, s.start + lo - offset, s.start + hi - offset))
        offset += s.size
    return out


def _remaining(replay: Replay, step: int, end_step: int, global_batch: int) -> tuple[Segment, ...]:
    """What the replay's ranks have not read yet at `step` (end_step: where it ends)."""
    steps = end_step - replay.first_step
    done = (step - replay.first_step) * global_batch // replay.world_size
    rest = []
    for rank in range(replay.world_size):
        start, stop = _block(replay, rank, steps, global_batch)
        rest += _slice(replay.segments, start + done, stop)
    return tuple(rest)


class Streams:
    """Readers of any rank of any layout of the training split (built on first use, kept):
    the live one of this rank, and those that rebuild an old layout's streams."""

    def __init__(
        self,
        cfg: Config,
        meta: dict,
        device: torch.device,
        live: dict[tuple[DataLayout, int], ShardReader] | None = None,
    ):
        self._cfg, self._meta, self._device = cfg, meta, device
        self._readers = dict(live or {})

    def reader(self, layout: DataLayout, rank: int) -> ShardReader:
        key = (layout, rank)
        if key not in self._readers:
            cfg = replace(self._cfg, data=replace(self._cfg.data, num_workers=layout.num_workers))
            self._readers[key] = build_reader(
                cfg,
                cfg.data.train_split,
                self._meta,
                train=True,
                batch_size=layout.micro_batch,
                rank=rank,
                world_size=layout.world_size,
                device=self._device,
            )
        return self._readers[key]

    def epoch_length(self, layout: DataLayout, rank: int) -> int:
        return self.reader(layout, rank).batches_per_epoch

    def set_shift_pixels(self, pixels: int) -> None:
        """Train on images shifted by ±`pixels` from the next batch on, in every reader, those
        built later included (data.shift_until ends the shift this way: train/pacing.py)."""
        self._cfg = replace(self._cfg, data=replace(self._cfg.data, shift_pixels=pixels))
        for reader in self._readers.values():
            reader.augment = replace(reader.augment, shift_pixels=pixels)


def rank_batches(
    position: DataPosition, step: int, rank: int, global_batch: int, streams: Streams
) -> Iterator[Batch]:
    """This rank's micro-batches from `step` on: the rest of its replay block (if any), then its
    own stream from `position.start_epoch`."""
    layout = position.layout
    replay = position.replay
    if replay is not None and step < position.start_step:
        steps = position.start_step - replay.first_step
        start, stop = _block(replay, rank, steps, global_batch)
        done = (step - replay.first_step) * global_batch // replay.world_size
        pieces = _slice(replay.segments, start + done, stop)
        samples = (
            b for s in pieces for b in _read_segment(streams.reader(replay.layout, s.rank), s)
        )
        yield from _rebatch(samples, layout.micro_batch)
        step = position.start_step
    reader = streams.reader(layout, rank)
    done = (step - position.start_step) * layout.accumulation(global_batch)
    yield from reader.batches(start=position.start_epoch * reader.batches_per_epoch + done)


def _read_segment(reader: ShardReader, segment: Segment) -> Iterator[Batch]:
    """The samples of `segment` from `reader`'s stream, as batches cut to the segment."""
    micro = reader.batch_size
    first, offset = divmod(segment.start, micro)
    left = segment.size
    batches = reader.batches(start=segment.epoch * reader.batches_per_epoch + first)
    try:
        for batch in batches:
            piece = _cut(batch, offset, offset + left)
            offset = 0
            left -= piece.labels.shape[0]
            yield piece
            if left == 0:
                return
    finally:
        batches.close()  # stops its DataLoader workers now


def _cut(batch: Batch, start: int, stop: int) -> Batch:
    recon = batch.recon_targets
    return Batch(
        batch.images[start:stop],
        batch.labels[start:stop],
        None if recon is None else recon[start:stop],
    )


def _rebatch(pieces: Iterator[Batch], size: int) -> Iterator[Batch]:
    """Batches of exactly `size` samples from pieces of any size (the total is a multiple)."""
    held: list[Batch] = []
    count = 0
    for piece in pieces:
        held.append(piece)
        count += piece.labels.shape[0]
        while count >= size:
            merged = _concat(held)
            yield _cut(merged, 0, size)
            rest = _cut(merged, size, count)
            held, count = ([rest] if count > size else []), count - size
    if count:
        raise RuntimeError(f"replay left {count} samples, not a whole micro-batch of {size}")


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    recon = (
        None if batches[0].recon_targets is None else torch.cat([b.recon_targets for b in batches])
    )
    return Batch(
        torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]), recon
    )
