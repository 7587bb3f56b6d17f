"""The per-worker sample stream: read tar shards → check + decode → shuffle → batch.

Everything here runs inside one reader process (the trainer, or one DataLoader worker) and is
plain generators over plain data, so it pickles to workers and is easy to test. Per-sample work
is kept to slicing bytes: images of a batch are joined and decoded with one `np.frombuffer`.
A bad sample either stops the run with a DataError naming the shard and the sample key
(`on_error="raise"`) or is left out and counted (`"skip"`); the count travels with the batches.
A shard whose sha256 is not the one in meta.json is bad as a whole (checksum.py). Skipping gives
up after MAX_CONSECUTIVE_SKIPS bad samples in a row: data that bad is damaged, not noisy, and a
reader that skips everything would otherwise run (and log) forever.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from capsdist.data.images import RAW_FIELD, ImageError, decode_image
from capsdist.data.source import LoadedShard
from capsdist.data.tar import group_samples, printable, tar_members
from capsdist.data.urls import DataError

Sample = tuple[str, bytes, tuple[int, ...], bytes | None]  # key, HWC pixels, labels, recon pixels
MAX_SKIP_MESSAGES = 5  # per reader process; later skips are only counted
# A constant for now; a config key (data.max_consecutive_skips) if data sets ever need another.
MAX_CONSECUTIVE_SKIPS = 1000


class RawBatch(NamedTuple):
    """A batch as a worker hands it over: still uint8, not yet on the device."""

    images: torch.Tensor | None
    """uint8 (B, H, W, C); None for a batch that only reports skipped samples."""
    labels: torch.Tensor | None
    """int64 (B,) or (B, T)."""
    recon: torch.Tensor | None
    """uint8 (B, T, H, W, C) reconstruction targets, if the shards carry them."""
    skipped: int
    """Samples left out (data.on_error=skip) since the previous batch of this stream."""


@dataclass(frozen=True)
class SampleFormat:
    """What every sample must look like (from meta.json), and what to do when one does not."""

    image_shape: tuple[int, int, int]  # H, W, C
    num_classes: int
    num_targets: int
    recon_shape: tuple[int, ...] | None = None  # T, H, W, C of the `recon.u8` field, if any
    on_error: str = "raise"  # or "skip"
    image_field: str = RAW_FIELD  # or `png`, `jpg`, ...: decoded here (images.py)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], on_error: str, recon: bool = True) -> SampleFormat:
        """What meta.json says every sample holds (`recon.u8` too, if any and `recon`)."""
        recon_shape = meta.get("recon_shape") if recon else None
        return cls(
            tuple(meta["image_shape"]),
            meta["num_classes"],
            meta["num_targets"],
            tuple(recon_shape) if recon_shape else None,
            on_error,
            meta.get("image_field", RAW_FIELD),
        )

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def recon_bytes(self) -> int:
        return int(np.prod(self.recon_shape)) if self.recon_shape else 0


class Skips:
    """Counts samples left out under on_error=skip and says why for the first `max_messages`;
    gives up (DataError) after MAX_CONSECUTIVE_SKIPS bad samples with no good one between."""

    def __init__(self, on_error: str, max_messages: int = MAX_SKIP_MESSAGES):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be raise or skip, got {on_error!r}")
        self.skip = on_error == "skip"
        self.max_messages = max_messages
        self.pending = 0  # not yet reported with a batch
        self.messages = 0
        self.streak = 0
        """Bad samples since the last good one; the stream's good samples set it back to 0."""

    def __call__(self, message: str, count: int = 1) -> None:
        """Raise DataError(message), or (skip mode) count `count` samples as left out."""
        if not self.skip:
            raise DataError(message)
        self.streak += count
        if self.streak >= MAX_CONSECUTIVE_SKIPS:
            raise DataError(
                f"{self.streak} consecutive bad samples, the last: {message}; data.on_error=skip "
                f"gives up after {MAX_CONSECUTIVE_SKIPS}: the data is damaged, rewrite it"
            )
        self.pending += count
        self.messages += 1
        if self.messages <= self.max_messages:
            last = self.messages == self.max_messages
            more = " (further skips are only counted)" if last else ""
            print(f"capsdist data: skipped {count}: {message}{more}", file=sys.stderr, flush=True)

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


def mix_seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (seed, rank, epoch, ...), via SeedSequence."""
    state = np.random.SeedSequence([p & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def read_shard(shard: LoadedShard, skips: Skips | None = None) -> Iterator[dict]:
    """webdataset-style samples ({"__key__", "__url__", "img.u8", "cls", ...}) of one loaded
    shard (source.py), up to its task's limit.

    A shard that cannot be read, is cut short or damaged, or holds a different number of
    samples than meta.json says raises DataError naming the file (and the sample, when known);
    under on_error=skip the samples before the damage are kept and the missing ones counted.
    A shard that parses but is not the file meta.json describes (sha256) is refused whole.
    """
    try:
        yield from _samples(shard, skips or Skips("raise"))
    finally:
        shard.release()


def _samples(shard: LoadedShard, skips: Skips) -> Iterator[dict]:
    task, data = shard.task, shard.data
    if shard.problem:
        skips(shard.problem, task.limit)
        return
    members, error = tar_members(data)
    # Damage found while parsing is named more precisely (the sample) than a digest could.
    mismatch = None if error else shard.mismatch()
    if mismatch:
        skips(mismatch, task.limit)
        return
    if error is not None and error.key is not None:
        # The damaged sample may have lost only some fields: leave it out whole.
        members = [m for m in members if not _has_key(m.name, error.key)]
    count = 0
    for sample in group_samples(data, members):
        if count == task.limit:
            if task.limit == task.expected:
                skips(f"{task.url}: holds more samples than the {task.expected} in meta.json", 0)
            return  # with max_examples, the rest of the shard is not needed
        sample["__url__"] = task.url
        count += 1
        yield sample
    if error is not None and count < task.limit:
        at = f" at sample {printable(error.key)}" if error.key else ""
        skips(f"{task.url}: unreadable or truncated shard{at} ({error})", task.limit - count)
    elif count < task.limit:
        skips(
            f"{task.url}: holds {count} samples, meta.json says {task.expected} "
            f"(truncated or replaced shard; rewrite the data set with `capsdist data ...`)",
            task.limit - count,
        )


def _has_key(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".")


def decode(
    samples: Iterable[dict], fmt: SampleFormat, skips: Skips | None = None
) -> Iterator[Sample]:
    """Check each sample against meta.json (pixel count, label count and range) → Sample."""
    skips = skips or Skips(fmt.on_error)
    image_bytes, recon_bytes = fmt.image_bytes, fmt.recon_bytes
    num_classes, num_targets = fmt.num_classes, fmt.num_targets
    field = fmt.image_field
    for sample in samples:
        key, url = sample.get("__key__"), sample.get("__url__")
        image, cls = sample.get(field), sample.get("cls")
        recon = sample.get("recon.u8") if recon_bytes else None
        if image is None or cls is None or (recon_bytes and recon is None):
            fields = sorted(k for k in sample if not k.startswith("__"))
            needed = f"{field}, cls" + (", recon.u8" if recon_bytes else "")
            skips(f"{_where(url, key)} lacks one of {needed} (has {fields})")
            continue
        if field != RAW_FIELD:
            try:
                pixels = decode_image(image)
            except ImageError as exn:
                skips(f"{_where(url, key)}: {field}: {exn}")
                continue
            if pixels.shape != fmt.image_shape:
                skips(
                    f"{_where(url, key)}: {field} is {list(pixels.shape)} (H, W, C), the "
                    f"image_shape in meta.json is {list(fmt.image_shape)}"
                )
                continue
            image = pixels.tobytes()
        elif len(image) != image_bytes:
            skips(
                f"{_where(url, key)}: img.u8 holds {len(image)} bytes, the image_shape in "
                f"meta.json needs {image_bytes}"
            )
            continue
        if recon is not None and len(recon) != recon_bytes:
            skips(
                f"{_where(url, key)}: recon.u8 holds {len(recon)} bytes, the recon_shape in "
                f"meta.json needs {recon_bytes}"
            )
            continue
        try:
            labels = tuple(int(part) for part in cls.split(b","))
        except ValueError:
            skips(f"{_where(url, key)}: cls {cls[:20]!r} is not integer labels")
            continue
        if len(labels) != num_targets or not all(0 <= y < num_classes for y in labels):
            skips(
                f"{_where(url, key)}: label(s) {','.join(map(str, labels))} do not fit "
                f"meta.json (num_targets {num_targets}, classes 0..{num_classes - 1})"
            )
            continue
        skips.streak = 0
        yield key, image, labels, recon


def _where(url: str, key: str) -> str:
    """`SHARD: sample KEY` for messages; KEY comes from the shard, so it is shown escaped."""
    return f"{url}: sample {printable(key)}"


def shuffle(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: hold `buffer_size` items, emit a random one as each new item arrives.

    Deterministic given `rng` (webdataset's own shuffle seeds itself from the process).
    """
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def batch(
    samples: Iterable[Sample],
    batch_size: int,
    fmt: SampleFormat,
    drop_last: bool,
    skips: Skips | None = None,
) -> Iterator[RawBatch]:
    """Group samples → RawBatch (uint8 images (B, H, W, C), int64 labels (B,) or (B, T), ...).

    `skips` is the counter the upstream stages report to; its count rides on the next batch
    (or on a last, image-less RawBatch when samples were skipped after the last batch).
    """
    skips = skips or Skips(fmt.on_error)
    images, labels, recons = [], [], []
    for _, image, label, recon in samples:
        images.append(image)
        labels.append(label)
        recons.append(recon)
        if len(images) == batch_size:
            yield _stack(images, labels, recons, fmt, skips.take())
            images, labels, recons = [], [], []
    if images and not drop_last:
        yield _stack(images, labels, recons, fmt, skips.take())
    if skips.pending:
        yield RawBatch(None, None, None, skips.take())


def _stack(images: list[bytes], labels, recons, fmt: SampleFormat, skipped: int) -> RawBatch:
    # One join + frombuffer per batch; bytearray so the tensor does not wrap read-only memory.
    pixels = np.frombuffer(bytearray().join(images), dtype=np.uint8)
    targets = torch.tensor(labels, dtype=torch.int64)  # (B, T)
    if targets.shape[1] == 1:
        targets = targets[:, 0]  # (B,)
    recon = None
    if fmt.recon_shape:
        flat = np.frombuffer(bytearray().join(recons), dtype=np.uint8)
        recon = torch.from_numpy(flat.reshape(len(recons), *fmt.recon_shape))  # (B, T, H, W, C)
    images_t = torch.from_numpy(pixels.reshape(len(images), *fmt.image_shape))  # (B, H, W, C)
    return RawBatch(images_t, targets, recon, skipped)
