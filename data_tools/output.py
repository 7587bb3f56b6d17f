"""Write a whole data set into an output folder: guard the folder, write shards, then meta.json.

meta.json is written last (atomically) and removed before shards are rewritten, so a folder
with a meta.json always holds a complete data set. `fingerprint` (a sha256 of the content,
independent of sharding) lets a re-run tell "the same data again" (fine: regenerate) from
"different data" (refused: it would silently replace someone's data set).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.errors import DataToolError
from data_tools.shards import ShardInfo, ShardWriter, encode_label

META_NAME = "meta.json"
FORMAT_VERSION = 1


def array_fingerprint(
    dataset: str, num_classes: int, splits: dict[str, tuple[np.ndarray, np.ndarray]]
) -> str:
    """sha256 over the data set's name, classes and every split's images and labels, in order."""
    digest = hashlib.sha256(json.dumps([dataset, num_classes]).encode())
    for name in sorted(splits):
        images, labels = splits[name]
        header = [name, list(images.shape), list(labels.shape)]
        digest.update(json.dumps(header).encode())
        digest.update(np.ascontiguousarray(images).data)
        digest.update(np.ascontiguousarray(labels, dtype="<i8").data)
    return digest.hexdigest()


def claim_out_folder(out: Path, dataset: str, fingerprint: str) -> dict[str, Any] | None:
    """Create `out` if needed and check it holds no other data; returns its old meta, if any.

    Raises DataToolError if `out` already holds a different data set (other name or content).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise DataToolError(f"{out}: cannot create the output folder ({exn})") from exn
    meta_path = out / META_NAME
    if not meta_path.exists():
        return None
    remedy = "choose another --out or delete that folder first"
    try:
        old = json.loads(meta_path.read_text())
        old_dataset, old_fingerprint = old["dataset"], old.get("fingerprint")
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise DataToolError(
            f"{meta_path}: exists but is not a capsdist meta.json ({exn}); refusing to write "
            f"into {out}: {remedy}"
        ) from exn
    if old_dataset != dataset:
        raise DataToolError(
            f"{out}: already holds data set {old_dataset!r}; refusing to replace it with "
            f"{dataset!r}: {remedy}"
        )
    if old_fingerprint != fingerprint:
        raise DataToolError(
            f"{out}: already holds different {dataset!r} data (other source, seed or content); "
            f"refusing to replace it: {remedy}"
        )
    return old


def write_meta(out: Path, meta: dict[str, Any]) -> Path:
    """Write meta.json atomically (temp file + rename)."""
    path = out / META_NAME
    tmp = path.with_name(META_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of `images / 255` for uint8 (N, H, W, C), in float64 chunks."""
    stats = StatsAccumulator()
    for start in range(0, len(images), chunk):
        stats.add(images[start : start + chunk])
    return stats.result()


def _check_arrays(splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int) -> None:
    shapes = {images.shape[1:] for images, _ in splits.values()}
    if len(shapes) != 1:
        raise ValueError(f"all splits need one image shape, got {shapes}")
    for name, (images, labels) in splits.items():
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: images must be uint8 (N, H, W, C), got {images.dtype}")
        if len(labels) != len(images) or labels.ndim not in (1, 2):
            raise ValueError(f"{name}: labels {labels.shape} do not match images {images.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name}: labels outside [0, {num_classes})")


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
    """Write in-memory splits as shards + meta.json into `out`; returns a short summary.

    `splits` maps split name → (uint8 images (N, H, W, C), int labels (N,) or (N, T)).
    mean/std in meta.json come from the `train` split (the first split if there is none).
    """
    started = time.perf_counter()
    out = Path(out)
    _check_arrays(splits, num_classes)
    fingerprint = array_fingerprint(dataset, num_classes, splits)
    old_meta = claim_out_folder(out, dataset, fingerprint)
    # Until the new meta.json is written, the folder must not look complete.
    (out / META_NAME).unlink(missing_ok=True)

    written: dict[str, list[ShardInfo]] = {}
    total = sum(len(images) for images, _ in splits.values())
    bar = tqdm(
        total=total, desc=f"{dataset} shards", unit="img", file=sys.stderr, disable=not progress
    )
    with bar:
        for name, (images, labels) in splits.items():
            with ShardWriter(out, name, samples_per_shard) as writer:
                for i in range(len(images)):
                    fields = {"img.u8": images[i].tobytes(), "cls": encode_label(labels[i])}
                    writer.write(f"{name}_{i:08d}", fields)
                    bar.update(1)
            written[name] = writer.shards

    stats_split = "train" if "train" in splits else next(iter(splits))
    mean, std = channel_stats(splits[stats_split][0])
    first_labels = next(iter(splits.values()))[1]
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        **(extra_meta or {}),
        "splits": {name: len(images) for name, (images, _) in splits.items()},
        "image_shape": list(next(iter(splits.values()))[0].shape[1:]),
        "num_classes": num_classes,
        "num_targets": 1 if first_labels.ndim == 1 else first_labels.shape[1],
        "mean": mean,
        "std": std,
        "label_counts": {
            name: np.bincount(labels.ravel(), minlength=num_classes).tolist()
            for name, (_, labels) in splits.items()
        },
        "fingerprint": fingerprint,
    }
    return _publish(out, meta, written, old_meta, started)


def _publish(
    out: Path,
    meta: dict[str, Any],
    written: dict[str, list[ShardInfo]],
    old_meta: dict | None,
    started: float,
) -> dict[str, Any]:
    """Add the written shards to `meta`, write meta.json (last: it marks the folder complete),
    drop shards of an earlier sharding, and return the command's summary."""
    meta["shards"] = {s.name: s.sha256 for shards in written.values() for s in shards}
    meta["shard_sizes"] = {s.name: s.num_samples for shards in written.values() for s in shards}
    write_meta(out, meta)
    _remove_stale_shards(out, old_meta, meta)
    return {
        "dataset": meta["dataset"],
        "out": str(out),
        "splits": meta["splits"],
        "num_shards": len(meta["shards"]),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _remove_stale_shards(out: Path, old_meta: dict | None, meta: dict) -> None:
    """Delete shards the previous run listed that this run did not write (other sharding)."""
    if not old_meta or not isinstance(old_meta.get("shards"), dict):
        return
    for name in old_meta["shards"]:
        if name not in meta["shards"] and "/" not in name and name.endswith(".tar"):
            (out / name).unlink(missing_ok=True)


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


def write_sample_stream(
    out: str | Path,
    *,
    dataset: str,
    fingerprint: str,
    splits: dict[str, tuple[int, Any]],
    num_classes: int,
    samples_per_shard: int = 1000,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write data too large for memory (MultiMNIST: 60 M pairs) chunk by chunk.

    `splits` maps split name → (number of samples, a zero-argument callable returning an
    iterator of chunks `(images uint8 (n, H, W, C), labels (n,) or (n, T), recon uint8
    (n, T, H, W, C) or None)`). `fingerprint` must identify the content (source + parameters),
    since it cannot be hashed before writing. Same guarantees as `write_array_dataset`.
    """
    started = time.perf_counter()
    out = Path(out)
    old_meta = claim_out_folder(out, dataset, fingerprint)
    (out / META_NAME).unlink(missing_ok=True)
    written: dict[str, list[ShardInfo]] = {}
    counts: dict[str, np.ndarray] = {}
    stats = StatsAccumulator()
    shapes: dict[str, Any] = {}
    total = sum(n for n, _ in splits.values())
    bar = tqdm(
        total=total, desc=f"{dataset} shards", unit="img", file=sys.stderr, disable=not progress
    )
    with bar:
        for name, (expected, chunks) in splits.items():
            counts[name] = np.zeros(num_classes, dtype=np.int64)
            index = 0
            with ShardWriter(out, name, samples_per_shard) as writer:
                for images, labels, recon in chunks():
                    shapes.setdefault("image_shape", list(images.shape[1:]))
                    shapes.setdefault("num_targets", 1 if labels.ndim == 1 else labels.shape[1])
                    if recon is not None:
                        shapes.setdefault("recon_shape", list(recon.shape[1:]))
                    if name == "train" or (name == next(iter(splits)) and "train" not in splits):
                        stats.add(images)
                    counts[name] += np.bincount(labels.ravel(), minlength=num_classes)
                    for i in range(len(images)):
                        fields = {"img.u8": images[i].tobytes(), "cls": encode_label(labels[i])}
                        if recon is not None:
                            fields["recon.u8"] = recon[i].tobytes()
                        writer.write(f"{name}_{index:09d}", fields)
                        index += 1
                    bar.update(len(images))
            if index != expected:
                raise AssertionError(f"{name}: wrote {index} samples, planned {expected}")
            written[name] = writer.shards
    mean, std = stats.result()
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        **(extra_meta or {}),
        "splits": {name: n for name, (n, _) in splits.items()},
        **shapes,
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "label_counts": {name: c.tolist() for name, c in counts.items()},
        "fingerprint": fingerprint,
    }
    return _publish(out, meta, written, old_meta, started)
