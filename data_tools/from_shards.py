"""Read a converted data set back into arrays: the input of MultiMNIST, expanded MNIST and
affNIST-like, which are all made from MNIST shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capsdist.data.meta import read_meta, split_shards
from capsdist.data.stream import SampleFormat, ShardTask, batch, decode, read_shard
from data_tools.errors import DataToolError


def load_split(
    root: str | Path, split: str, dataset: str = "mnist"
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 images (N, H, W, C), int64 labels (N,), meta) of `split`, every shard checked."""
    root = Path(root)
    meta = read_meta(root)
    if meta["dataset"] != dataset or meta["num_targets"] != 1:
        raise DataToolError(
            f"{root}: holds {meta['dataset']!r} with {meta['num_targets']} target(s); "
            f"--src must be {dataset!r} shards from `capsdist data {dataset} ...`"
        )
    fmt = SampleFormat(tuple(meta["image_shape"]), meta["num_classes"], 1)
    tasks = [
        ShardTask(str(root / name), meta["shard_sizes"][name], meta["shard_sizes"][name])
        for name in split_shards(meta, split, root)
    ]
    samples = decode((s for t in tasks for s in read_shard(t)), fmt)
    chunks = list(batch(samples, 10_000, fmt, drop_last=False))
    images = np.concatenate([c.images.numpy() for c in chunks])
    labels = np.concatenate([c.labels.numpy() for c in chunks])
    return images, labels, meta
