"""The per-worker sample stream: read tar shards → check + decode → shuffle → batch.

Everything here runs inside one reader process (the trainer, or one DataLoader worker) and is
plain generators over plain data, so it pickles to workers and is easy to test. Per-sample work
is kept to slicing bytes: images of a batch are joined and decoded with one `np.frombuffer`.
A bad sample either stops the run with a DataError naming the shard and the sample key
(`on_error="raise"`) or is left out and counted (`"skip"`); the count travels with the batches.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from capsdist.data.meta import DataError
from capsdist.data.tar import group_samples, tar_members

Sample = tuple[str, bytes, tuple[int, ...], bytes | None]  # key, HWC pixels, labels, recon pixels
MAX_SKIP_MESSAGES = 5  # per reader process; later skips are only counted


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
class ShardTask:
    """One shard to read: its path, its size per meta.json, and how many samples to take."""

    path: str
    expected: int
    limit: int


def shard_tasks(
    root: Path, meta: dict[str, Any], names: list[str], max_examples: int = 0
) -> list[ShardTask]:
    """These shards of `root` with the samples to take from each (all, unless max_examples)."""
    tasks, left = [], max_examples if max_examples > 0 else math.inf
    for name in names:
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: shard listed in meta.json is missing")
        size = meta["shard_sizes"][name]
        take = int(min(size, left))
        if take > 0:
            tasks.append(ShardTask(str(path), size, take))
        left -= take
    return tasks


@dataclass(frozen=True)
class SampleFormat:
    """What every sample must look like (from meta.json), and what to do when one does not."""

    image_shape: tuple[int, int, int]  # H, W, C
    num_classes: int
    num_targets: int
    recon_shape: tuple[int, ...] | None = None  # T, H, W, C of the `recon.u8` field, if any
    on_error: str = "raise"  # or "skip"

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
        )

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def recon_bytes(self) -> int:
        return int(np.prod(self.recon_shape)) if self.recon_shape else 0


class Skips:
    """Counts samples left out under on_error=skip and says why for the first few."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be raise or skip, got {on_error!r}")
        self.skip = on_error == "skip"
        self.pending = 0  # not yet reported with a batch
        self.messages = 0

    def __call__(self, message: str, count: int = 1) -> None:
        """Raise DataError(message), or (skip mode) count `count` samples as left out."""
        if not self.skip:
            raise DataError(message)
        self.pending += count
        self.messages += 1
        if self.messages <= MAX_SKIP_MESSAGES:
            more = " (further skips are only counted)" if self.messages == MAX_SKIP_MESSAGES else ""
            print(f"capsdist data: skipped {count}: {message}{more}", file=sys.stderr, flush=True)

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


def mix_seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (seed, rank, epoch, ...), via SeedSequence."""
    state = np.random.SeedSequence([p & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def read_shard(task: ShardTask, skips: Skips | None = None) -> Iterator[dict]:
    """webdataset-style samples ({"__key__", "__url__", "img.u8", "cls", ...}) of one shard, up
    to task.limit.

    A shard that cannot be read, is cut short or damaged, or holds a different number of
    samples than meta.json says raises DataError naming the file (and the sample, when known);
    under on_error=skip the samples before the damage are kept and the missing ones counted.
    """
    skips = skips or Skips("raise")
    try:
        with open(task.path, "rb") as f:
            data = f.read()
    except OSError as exn:
        skips(f"{task.path}: cannot read the shard ({exn.strerror or exn})", task.limit)
        return
    members, error = tar_members(data)
    if error is not None and error.key is not None:
        # The damaged sample may have lost only some fields: leave it out whole.
        members = [m for m in members if not _has_key(m.name, error.key)]
    count = 0
    for sample in group_samples(data, members):
        if count == task.limit:
            if task.limit == task.expected:
                skips(f"{task.path}: holds more samples than the {task.expected} in meta.json", 0)
            return  # with max_examples, the rest of the shard is not needed
        sample["__url__"] = task.path
        count += 1
        yield sample
    if error is not None and count < task.limit:
        at = f" at sample {error.key}" if error.key else ""
        skips(f"{task.path}: unreadable or truncated shard{at} ({error})", task.limit - count)
    elif count < task.limit:
        skips(
            f"{task.path}: holds {count} samples, meta.json says {task.expected} "
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
    for sample in samples:
        key, url = sample.get("__key__"), sample.get("__url__")
        image, cls = sample.get("img.u8"), sample.get("cls")
        recon = sample.get("recon.u8") if recon_bytes else None
        if image is None or cls is None or (recon_bytes and recon is None):
            fields = sorted(k for k in sample if not k.startswith("__"))
            needed = "img.u8, cls" + (", recon.u8" if recon_bytes else "")
            skips(f"{url}: sample {key} lacks one of {needed} (has {fields})")
            continue
        if len(image) != image_bytes:
            skips(
                f"{url}: sample {key}: img.u8 holds {len(image)} bytes, the image_shape in "
                f"meta.json needs {image_bytes}"
            )
            continue
        if recon is not None and len(recon) != recon_bytes:
            skips(
                f"{url}: sample {key}: recon.u8 holds {len(recon)} bytes, the recon_shape in "
                f"meta.json needs {recon_bytes}"
            )
            continue
        try:
            labels = tuple(int(part) for part in cls.split(b","))
        except ValueError:
            skips(f"{url}: sample {key}: cls {cls[:20]!r} is not integer labels")
            continue
        if len(labels) != num_targets or not all(0 <= y < num_classes for y in labels):
            skips(
                f"{url}: sample {key}: label(s) {','.join(map(str, labels))} do not fit "
                f"meta.json (num_targets {num_targets}, classes 0..{num_classes - 1})"
            )
            continue
        yield key, image, labels, recon


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
