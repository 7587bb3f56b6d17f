"""`capsdist data mnist` / `fashion-mnist`: IDX files → train (60,000) / test (10,000) shards.

Fashion-MNIST ships in exactly MNIST's format and file names; only the name, the default
folder (Debian's `dataset-fashion-mnist` package) and the download location differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_tools.errors import DataToolError
from data_tools.idx import load_mnist_idx
from data_tools.output import write_array_dataset
from data_tools.sources import resolve_src

NUM_CLASSES = 10
FASHION_MNIST_SRC = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def make_idx_dataset(
    dataset: str,
    src: str | Path | None,
    out: str | Path,
    *,
    default_src: str | None = None,
    mirror: str | None = None,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert MNIST-format IDX files (plain or .gz) into shards + meta.json in `out`;
    without `src` (and no `default_src` folder) they are downloaded and checked first."""
    src = resolve_src(dataset, src, out, default_src=default_src, mirror=mirror, progress=progress)
    splits = load_mnist_idx(src)
    for split, (images, labels) in splits.items():
        if images.shape[1:] != (28, 28, 1):
            raise DataToolError(
                f"{src}: {split} images are {images.shape[1:3]}, {dataset} is 28x28"
            )
        if labels.max() >= NUM_CLASSES:
            raise DataToolError(f"{src}: {split} labels go up to {labels.max()}, {dataset} has 0-9")
    return write_array_dataset(
        out,
        dataset=dataset,
        splits=splits,
        num_classes=NUM_CLASSES,
        samples_per_shard=samples_per_shard,
        extra_meta={"source": f"IDX files in {Path(src).resolve()}"},
        progress=progress,
    )


def make_mnist(
    src: str | Path | None,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    progress: bool = True,
    mirror: str | None = None,
) -> dict[str, Any]:
    """The four MNIST IDX files in `src` (None: download them) → `mnist` shards in `out`."""
    return make_idx_dataset(
        "mnist", src, out, mirror=mirror, samples_per_shard=samples_per_shard, progress=progress
    )


def make_fashion_mnist(
    src: str | Path | None,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    progress: bool = True,
    mirror: str | None = None,
) -> dict[str, Any]:
    """Fashion-MNIST's IDX files in `src` (default: Debian's folder, else download)."""
    return make_idx_dataset(
        "fashion_mnist",
        src,
        out,
        default_src=FASHION_MNIST_SRC,
        mirror=mirror,
        samples_per_shard=samples_per_shard,
        progress=progress,
    )
