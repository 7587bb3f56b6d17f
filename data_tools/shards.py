"""Write a data set into an output folder: webdataset tar shards, then meta.json.

Shards are `{split}-{shard:06d}.tar`; each sample holds `{key}.img.u8` (raw uint8 pixels, HWC,
no header: the reader knows the shape from meta.json) and `{key}.cls` (ASCII label, `b"7"`, or
`b"3,8"` for two targets), plus any extra field (`recon.u8`). Tar headers carry fixed times and
owners, so the same content always gives byte-identical shards (and the same sha256s).

meta.json is written last (atomically) and removed before shards are rewritten, so a folder
with a meta.json always holds a complete data set. `fingerprint` (a sha256 of the content,
independent of sharding) lets a re-run tell "the same data again" (fine: regenerate) from
"different data" (refused: it would silently replace someone's data set). The output may be a
folder or an object store URL (destination.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.destination import DataToolError, Destination

__all__ = ["DataToolError", "ShardWriter", "write_array_dataset", "write_dataset"]
FORMAT_VERSION = 1
STATS_CHUNK = 8192  # images per float64 chunk of the mean/std pass

# One chunk of a split: uint8 images (n, H, W, C), labels (n,) or (n, T), and uint8
# reconstruction targets (n, T, H, W, C) or None.
Chunk = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def encode_label(label: int | Sequence[int]) -> bytes:
    """`7` → `b"7"`; `(3, 8)` → `b"3,8"` (two-target data such as MultiMNIST)."""
    if isinstance(label, (int, np.integer)):
        return str(int(label)).encode("ascii")
    return ",".join(str(int(x)) for x in label).encode("ascii")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """What meta.json records about one written shard."""

    name: str
    num_samples: int
    sha256: str


class ShardWriter:
    """Write the samples of one split into shards of `samples_per_shard` samples each.

    Each shard is written under a temporary name and renamed when complete, so a reader (or a
    re-run after a crash) never sees half a shard under its real name. Use as a context manager;
    `shards` lists what was written, in order; `on_shard(path)` is called with each complete
    shard (to upload it).
    """

    def __init__(
        self,
        out: str | Path,
        split: str,
        samples_per_shard: int = 1000,
        on_shard: Callable[[Path], None] | None = None,
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out = Path(out)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.shards: list[ShardInfo] = []
        self.on_shard = on_shard
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample: `fields` maps extension (`img.u8`, `cls`, ...) to its bytes."""
        if "." in key or "/" in key:
            # webdataset splits the key from the extension at the first dot of the file name.
            raise ValueError(f"sample key must not contain '.' or '/': {key!r}")
        if self._tar is None:
            # Closed in _finish_shard (or __exit__ on error): a shard spans many write() calls.
            self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            self._count = 0
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # fixed header fields: same content → same bytes → same sha256
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish_shard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tar is None:
            return
        if exc_type is None:
            self._finish_shard()  # the last, possibly smaller shard
        else:  # leave no temporary file behind; finished shards stay (a re-run overwrites them)
            self._tar.close()
            self._tmp_path().unlink(missing_ok=True)
            self._tar = None

    def _path(self) -> Path:
        return self.out / f"{self.split}-{len(self.shards):06d}.tar"

    def _tmp_path(self) -> Path:
        return self._path().with_name(self._path().name + ".tmp")

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tar = None
        path = self._path()
        os.replace(self._tmp_path(), path)
        self.shards.append(ShardInfo(path.name, self._count, sha256_file(path)))
        if self.on_shard is not None:
            self.on_shard(path)


class StatsAccumulator:
    """Per-channel mean/std of uint8 (N, H, W, C) chunks, accumulated in float64 (/ 255)."""

    def __init__(self) -> None:
        self.total = self.total_sq = None
        self.count = 0

    def add(self, images: np.ndarray) -> None:
        x = images.reshape(-1, images.shape[-1]).astype(np.float64)
        if self.total is None:
            self.total, self.total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        self.total += x.sum(0)
        self.total_sq += np.square(x).sum(0)
        self.count += x.shape[0]

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 0.0))
        return [round(float(m) / 255, 6) for m in mean], [round(float(s) / 255, 6) for s in std]


def write_dataset(
    out: str | Path,
    *,
    dataset: str,
    fingerprint: str,
    splits: dict[str, tuple[int, Callable[[], Iterable[Chunk]]]],
    num_classes: int,
    samples_per_shard: int = 1000,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
    key_digits: int = 9,
) -> dict[str, Any]:
    """Write every split as shards, then meta.json, into `out` (a folder or an object store
    URL); returns the command's summary.

    `splits` maps split name → (number of samples, a zero-argument callable returning its
    chunks), so that data too large for memory (MultiMNIST: 60 M pairs) is made chunk by chunk.
    `fingerprint` must identify the content (source + parameters). mean/std in meta.json come
    from the `train` split (the first split if there is none). Sample keys are `{split}_{index}`
    with `key_digits` digits (in-memory sets have always used 8; kept for identical shards).
    """
    started = time.perf_counter()
    with Destination(out) as out:
        old_meta = out.claim(dataset, fingerprint)
        stats_split = "train" if "train" in splits else next(iter(splits))
        stats = StatsAccumulator()
        shapes: dict[str, Any] = {}
        written: dict[str, list[ShardInfo]] = {}
        counts: dict[str, np.ndarray] = {}
        total = sum(n for n, _ in splits.values())
        bar = tqdm(
            total=total, desc=f"{dataset} shards", unit="img", file=sys.stderr, disable=not progress
        )
        with bar:
            for name, (expected, chunks) in splits.items():
                counts[name] = np.zeros(num_classes, dtype=np.int64)
                index = 0
                with ShardWriter(out.staging, name, samples_per_shard, out.finish_shard) as writer:
                    for images, labels, recon in chunks():
                        shapes.setdefault("image_shape", list(images.shape[1:]))
                        if recon is not None:
                            shapes.setdefault("recon_shape", list(recon.shape[1:]))
                        shapes.setdefault("num_targets", 1 if labels.ndim == 1 else labels.shape[1])
                        if name == stats_split:
                            stats.add(images)
                        counts[name] += np.bincount(labels.ravel(), minlength=num_classes)
                        for i in range(len(images)):
                            fields = {"img.u8": images[i].tobytes(), "cls": encode_label(labels[i])}
                            if recon is not None:
                                fields["recon.u8"] = recon[i].tobytes()
                            writer.write(f"{name}_{index:0{key_digits}d}", fields)
                            index += 1
                        bar.update(len(images))
                if index != expected:
                    raise AssertionError(f"{name}: wrote {index} samples, planned {expected}")
                written[name] = writer.shards
        mean, std = stats.result()
        num_targets = shapes.pop("num_targets")
        meta = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            **(extra_meta or {}),
            "splits": {name: n for name, (n, _) in splits.items()},
            **shapes,
            "num_classes": num_classes,
            "num_targets": num_targets,
            "mean": mean,
            "std": std,
            "label_counts": {name: c.tolist() for name, c in counts.items()},
            "fingerprint": fingerprint,
            "shards": {s.name: s.sha256 for shards in written.values() for s in shards},
            "shard_sizes": {s.name: s.num_samples for shards in written.values() for s in shards},
        }
        out.publish(json.dumps(meta, indent=2) + "\n")  # last: it marks the folder complete
        stale = old_meta.get("shards") if old_meta else None  # of an earlier, other sharding
        names = stale if isinstance(stale, dict) else ()
        out.remove(
            [n for n in names if n not in meta["shards"] and "/" not in n and n.endswith(".tar")]
        )
        return {
            "dataset": dataset,
            "out": out.out,
            "splits": meta["splits"],
            "num_shards": len(meta["shards"]),
            "seconds": round(time.perf_counter() - started, 2),
        }


def write_array_dataset(
    out: str | Path,
    *,
    dataset: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    samples_per_shard: int = 1000,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`write_dataset` for splits held in memory: split name → (uint8 images (N, H, W, C),
    int labels (N,) or (N, T)); the fingerprint is a sha256 of exactly these arrays."""
    shapes = {images.shape[1:] for images, _ in splits.values()}
    if len(shapes) != 1:
        raise ValueError(f"all splits need one image shape, got {shapes}")
    digest = hashlib.sha256(json.dumps([dataset, num_classes]).encode())
    for name, (images, labels) in sorted(splits.items()):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: images must be uint8 (N, H, W, C), got {images.dtype}")
        if len(labels) != len(images) or labels.ndim not in (1, 2):
            raise ValueError(f"{name}: labels {labels.shape} do not match images {images.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name}: labels outside [0, {num_classes})")
        digest.update(json.dumps([name, list(images.shape), list(labels.shape)]).encode())
        digest.update(np.ascontiguousarray(images).data)
        digest.update(np.ascontiguousarray(labels, dtype="<i8").data)

    def chunks(images: np.ndarray, labels: np.ndarray) -> Callable[[], Iterable[Chunk]]:
        # Chunks keep the float64 mean/std pass small (60,000 MNIST digits: 376 MB at once).
        starts = range(0, len(images), STATS_CHUNK)
        return lambda: (
            (images[s : s + STATS_CHUNK], labels[s : s + STATS_CHUNK], None) for s in starts
        )

    return write_dataset(
        out,
        dataset=dataset,
        fingerprint=digest.hexdigest(),
        splits={
            name: (len(images), chunks(images, labels)) for name, (images, labels) in splits.items()
        },
        num_classes=num_classes,
        samples_per_shard=samples_per_shard,
        extra_meta=extra_meta,
        progress=progress,
        key_digits=8,
    )
