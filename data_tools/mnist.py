"""`capsdist data mnist`: the official MNIST IDX files → train (60,000) / test (10,000) shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_tools.errors import DataToolError
from data_tools.idx import load_mnist_idx
from data_tools.output import write_array_dataset

NUM_CLASSES = 10


def make_mnist(
    src: str | Path, out: str | Path, *, samples_per_shard: int = 1000, progress: bool = True
) -> dict[str, Any]:
    """Convert the four MNIST IDX files in `src` (plain or .gz) into shards + meta.json in `out`.

    Returns a summary dict ({"dataset": "mnist", "out": ..., "splits": {...}, ...}).
    """
    splits = load_mnist_idx(src)
    for split, (images, labels) in splits.items():
        if images.shape[1:] != (28, 28, 1):
            raise DataToolError(f"{src}: {split} images are {images.shape[1:3]}, MNIST is 28x28")
        if labels.max() >= NUM_CLASSES:
            raise DataToolError(f"{src}: {split} labels go up to {labels.max()}, MNIST has 0-9")
    return write_array_dataset(
        out,
        dataset="mnist",
        splits=splits,
        num_classes=NUM_CLASSES,
        samples_per_shard=samples_per_shard,
        extra_meta={"source": f"MNIST IDX files in {Path(src).resolve()}"},
        progress=progress,
    )
