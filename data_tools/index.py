"""`capsdist data index SHARDS --out DIR`: meta.json for webdataset shards capsdist did not write.

A set written by `wds.ShardWriter` from an image folder holds samples such as `0001.png` +
`0001.cls`. capsdist's reader can train on it as it is (decoding the images in its workers) once
a meta.json says what it holds: splits and sample counts, image shape and field, classes,
mean/std, and each shard's sha256. This command reads every shard once to find those out, and
checks every sample on the way, so that a bad one is named now rather than mid-training.

SHARDS is a folder or URL (every `*.tar` in it) or a brace pattern of shard URLs. Shard names
must be `{split}-NNNNNN.tar` (`wds.ShardWriter("out/train-%06d.tar")`): the split is in the
name. meta.json goes to --out, a folder or object store URL; when that is not where the shards
are, meta.json records their place in `shard_root`, so the shards are never written to (they
may be someone else's, read-only) and `data.root=DIR` reads them where they are.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from tqdm import tqdm

from capsdist.data.fetch import filesystem, read_bytes, retrying
from capsdist.data.images import ImageError, decode_image, image_field
from capsdist.data.tar import group_samples, printable, tar_members
from capsdist.data.urls import describe, is_remote, join, local, parent
from data_tools.destination import DataToolError, Destination
from data_tools.shards import FORMAT_VERSION, STATS_CHUNK, StatsAccumulator

_NAME = re.compile(r"(.+)-\d{6}\.tar")


def list_shards(src: str) -> tuple[str, list[str]]:
    """(the folder or URL that holds the shards, their sorted file names) for SHARDS `src`."""
    src = local(src)
    if "{" in src:
        urls = list(braceexpand(src))
        folders = {parent(url) for url in urls}
        if len(folders) != 1:
            raise DataToolError(f"{src}: the shards must be in one folder, not {sorted(folders)}")
        folder, names = folders.pop(), [url.rsplit("/", 1)[-1] for url in urls]
    elif is_remote(src):
        fs, path = filesystem(src)
        entries = retrying(src, "list", lambda: fs.ls(path, detail=False))
        folder, names = src.rstrip("/"), [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
    else:
        if not Path(src).is_dir():
            raise DataToolError(f"{src}: not a folder; give the folder or URL of the shards")
        folder, names = src, [p.name for p in Path(src).iterdir()]
    names = sorted(name for name in names if name.endswith(".tar"))
    if not names:
        raise DataToolError(f"{src}: no .tar shards there")
    odd = [name for name in names if not _NAME.fullmatch(name)]
    if odd:
        raise DataToolError(
            f"{join(folder, odd[0])}: shard names must be SPLIT-NNNNNN.tar (train-000000.tar, "
            f"as wds.ShardWriter('train-%06d.tar') writes them), so that the split is known"
        )
    return folder, names


class _Survey:
    """What the samples of a set hold, checked sample by sample as the shards are read."""

    def __init__(self, stats_split: str):
        self.stats_split = stats_split
        self.field: str | None = None
        self.shape: tuple[int, ...] | None = None
        self.num_targets: int | None = None
        self.labels: dict[str, list[tuple[int, ...]]] = {}
        self.stats = StatsAccumulator()
        self._pending: list[np.ndarray] = []

    def add_shard(self, url: str, data: bytes, split: str) -> int:
        """Check and count the samples of one shard; returns how many it holds."""
        members, error = tar_members(data)
        if error is not None:
            at = f" at sample {printable(error.key)}" if error.key else ""
            raise DataToolError(f"{url}: unreadable or truncated shard{at} ({error})")
        count = 0
        for sample in group_samples(data, members):
            self._add_sample(f"{url}: sample {printable(sample['__key__'])}", sample, split)
            count += 1
        return count

    def _add_sample(self, where: str, sample: dict, split: str) -> None:
        field = image_field(sample)
        self.field = self.field or field
        if field != self.field or "cls" not in sample:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise DataToolError(f"{where}: needs {self.field or 'png/jpg'} and cls, has {fields}")
        try:
            pixels = decode_image(sample[field])
            labels = tuple(int(part) for part in sample["cls"].split(b","))
        except (ImageError, ValueError) as exn:
            raise DataToolError(f"{where}: {exn}") from exn
        self.shape = self.shape or pixels.shape
        self.num_targets = self.num_targets or len(labels)
        if pixels.shape != self.shape or len(labels) != self.num_targets:
            raise DataToolError(
                f"{where}: image {list(pixels.shape)} with {len(labels)} label(s), but the set "
                f"started with {list(self.shape)} and {self.num_targets}: all must agree"
            )
        self.labels.setdefault(split, []).append(labels)
        if split == self.stats_split:
            self._pending.append(pixels)
            if len(self._pending) == STATS_CHUNK:
                self.flush()

    def flush(self) -> None:
        if self._pending:
            self.stats.add(np.stack(self._pending))
            self._pending = []


def make_index(
    src: str,
    out: str | Path,
    *,
    dataset: str,
    num_classes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Read the webdataset shards `src` once and write their meta.json into `out`."""
    started = time.perf_counter()
    folder, names = list_shards(src)
    destination = Destination(out)
    destination.existing_meta(dataset)  # refused before reading a whole data set, not after
    splits = sorted({_NAME.fullmatch(name).group(1) for name in names})
    survey = _Survey("train" if "train" in splits else splits[0])
    digests, sizes = {}, {}
    for name in tqdm(names, desc=f"index {dataset}", unit="shard", disable=not progress):
        url = join(folder, name)
        data = _read(url)
        digests[name] = hashlib.sha256(data).hexdigest()
        sizes[name] = survey.add_shard(url, data, _NAME.fullmatch(name).group(1))
    survey.flush()
    if survey.field is None:
        raise DataToolError(f"{src}: the shards hold no samples")
    meta = _meta(dataset, survey, num_classes, digests, sizes, src)
    if describe(folder) != describe(destination.out):
        meta["shard_root"] = describe(folder)
    with destination:
        destination.claim(dataset, meta["fingerprint"])
        destination.publish(json.dumps(meta, indent=2) + "\n")
    print(f"capsdist data index: train with data.root={destination.out}", file=sys.stderr)
    return {
        "dataset": dataset,
        "out": destination.out,
        "splits": meta["splits"],
        "num_shards": len(names),
        "image_shape": meta["image_shape"],
        "image_field": meta["image_field"],
        "num_classes": meta["num_classes"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _read(url: str) -> bytes:
    if is_remote(url):
        return read_bytes(url)
    try:
        return Path(url).read_bytes()
    except OSError as exn:
        raise DataToolError(f"{url}: cannot read the shard ({exn.strerror or exn})") from exn


def _meta(dataset, survey, num_classes, digests, sizes, src) -> dict[str, Any]:
    highest = max(max(labels) for per_split in survey.labels.values() for labels in per_split)
    if num_classes is None:
        num_classes = highest + 1
    elif highest >= num_classes:
        raise DataToolError(
            f"{src}: a cls label is {highest}, not below --num-classes {num_classes}"
        )
    mean, std = survey.stats.result()
    counts = {
        split: np.bincount(np.ravel(labels), minlength=num_classes).tolist()
        for split, labels in survey.labels.items()
    }
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "source": f"webdataset shards at {describe(src)} (capsdist data index)",
        "splits": {split: len(labels) for split, labels in survey.labels.items()},
        "image_shape": list(survey.shape),
        "image_field": survey.field,
        "num_classes": num_classes,
        "num_targets": survey.num_targets,
        "mean": mean,
        "std": std,
        "label_counts": counts,
        "fingerprint": hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest(),
        "shards": digests,
        "shard_sizes": sizes,
    }
