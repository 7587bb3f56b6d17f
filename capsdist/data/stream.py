"""The per-worker sample stream: read tar shards → check + decode → shuffle → batch.

Everything here runs inside one reader process (the trainer, or one DataLoader worker) and is
plain generators over plain data, so it pickles to workers and is easy to test. Per-sample work
is kept to slicing bytes: images of a batch are joined and decoded with one `np.frombuffer`.
"""

from __future__ import annotations

import random
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds

from capsdist.data.meta import DataError

Sample = tuple[str, bytes, tuple[int, ...]]  # (key, raw HWC pixels, labels)


@dataclass(frozen=True)
class ShardTask:
    """One shard to read: its path, its size per meta.json, and how many samples to take."""

    path: str
    expected: int
    limit: int


def mix_seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (seed, rank, epoch, ...), via SeedSequence."""
    state = np.random.SeedSequence([p & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def read_shard(task: ShardTask) -> Iterator[dict]:
    """webdataset samples ({"__key__", "img.u8", "cls", ...}) of one shard, up to task.limit.

    A shard that cannot be read, is cut short, or holds a different number of samples than
    meta.json says raises DataError naming the file.
    """
    samples = wds.tarfile_to_samples()(iter([{"url": task.path}]))
    count = 0
    while True:
        try:
            sample = next(samples, None)
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exn:
            # webdataset appends the stream and url to args; keep only the first, readable part.
            reason = getattr(exn, "strerror", None) or (exn.args[0] if exn.args else "")
            reason = str(reason).split(" @ ")[0] or type(exn).__name__  # drop wds's " @ stream"
            raise DataError(f"{task.path}: unreadable or truncated shard ({reason})") from exn
        if sample is None:
            break
        if count == task.limit:
            if task.limit < task.expected:
                return  # max_examples reached; the rest of the shard is not needed
            raise DataError(
                f"{task.path}: holds more samples than the {task.expected} in meta.json"
            )
        count += 1
        yield sample
    if count < task.limit:
        raise DataError(
            f"{task.path}: holds {count} samples, meta.json says {task.expected} "
            f"(truncated or replaced shard; rewrite the data set with `capsdist data ...`)"
        )


def decode(
    samples: Iterable[dict], image_bytes: int, num_classes: int, num_targets: int
) -> Iterator[Sample]:
    """Check each sample against meta.json (pixel count, label count and range) → Sample."""
    for sample in samples:
        key, url = sample.get("__key__"), sample.get("__url__")
        image, cls = sample.get("img.u8"), sample.get("cls")
        if image is None or cls is None:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(f"{url}: sample {key} lacks img.u8 or cls (has {fields})")
        if len(image) != image_bytes:
            raise DataError(
                f"{url}: sample {key}: img.u8 holds {len(image)} bytes, the image_shape in "
                f"meta.json needs {image_bytes}"
            )
        try:
            labels = tuple(int(part) for part in cls.split(b","))
        except ValueError:
            raise DataError(
                f"{url}: sample {key}: cls {cls[:20]!r} is not integer labels"
            ) from None
        if len(labels) != num_targets or not all(0 <= y < num_classes for y in labels):
            raise DataError(
                f"{url}: sample {key}: label(s) {','.join(map(str, labels))} do not fit "
                f"meta.json (num_targets {num_targets}, classes 0..{num_classes - 1})"
            )
        yield key, image, labels


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
    samples: Iterable[Sample], batch_size: int, image_shape: tuple[int, ...], drop_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Group samples → (uint8 images (B, H, W, C), int64 labels (B,) or (B, T))."""
    images, labels = [], []
    for _, image, label in samples:
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield _stack(images, labels, image_shape)
            images, labels = [], []
    if images and not drop_last:
        yield _stack(images, labels, image_shape)


def _stack(images: list[bytes], labels: list[tuple[int, ...]], image_shape: tuple[int, ...]):
    # One join + frombuffer per batch; bytearray so the tensor does not wrap read-only memory.
    pixels = np.frombuffer(bytearray().join(images), dtype=np.uint8)
    targets = torch.tensor(labels, dtype=torch.int64)  # (B, T)
    if targets.shape[1] == 1:
        targets = targets[:, 0]  # (B,)
    return torch.from_numpy(pixels.reshape(len(images), *image_shape)), targets
