"""`capsdist data synthetic`: tiny random-but-valid shards in the real format, for tests.

Each image is faint noise plus a bright square whose position encodes the class (two squares for
two-target data), so a model can learn something from a few hundred samples. Named `mnist` by
default so that MNIST configs run on it unchanged; meta.json's `source` says it is synthetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.shards import write_array_dataset


def _class_squares(image_shape: Sequence[int], num_classes: int) -> tuple[np.ndarray, int]:
    """Top-left corners (num_classes, 2) of each class's square on a grid, and its side."""
    height, width = image_shape[:2]
    grid = math.ceil(math.sqrt(num_classes))
    side = max(1, min(height, width) // (2 * grid))
    steps = max(grid - 1, 1)
    corners = [
        ((c // grid) * (height - side) // steps, (c % grid) * (width - side) // steps)
        for c in range(num_classes)
    ]
    return np.array(corners), side


def synthetic_split(
    n: int, image_shape: Sequence[int], num_classes: int, num_targets: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n images uint8 (n, H, W, C) and labels (n,) or (n, 2) with distinct pairs."""
    first = rng.integers(0, num_classes, n)
    if num_targets == 1:
        labels = first
    else:  # a second, different class
        labels = np.stack([first, (first + rng.integers(1, num_classes, n)) % num_classes], 1)
    images = rng.integers(0, 40, (n, *image_shape), dtype=np.uint8)
    corners, side = _class_squares(image_shape, num_classes)
    for column in labels.reshape(n, -1).T:
        for i, (y, x) in enumerate(corners[column]):
            images[i, y : y + side, x : x + side] = 255
    return images, labels.astype(np.uint8)


def make_synthetic_shards(
    out: str | Path,
    *,
    n_train: int = 256,
    n_test: int = 64,
    image_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    num_targets: int = 1,
    seed: int = 0,
    samples_per_shard: int = 64,
    dataset: str = "mnist",
    progress: bool = False,
) -> dict[str, Any]:
    """Write small synthetic `train`/`test` shards + meta.json into `out` (deterministic in seed).

    Returns the same summary dict as the real converters.
    """
    if num_targets not in (1, 2) or (num_targets == 2 and num_classes < 2):
        raise ValueError(f"num_targets must be 1 or 2 (2 needs >= 2 classes), got {num_targets}")
    rng = np.random.default_rng(seed)
    splits = {
        "train": synthetic_split(n_train, image_shape, num_classes, num_targets, rng),
        "test": synthetic_split(n_test, image_shape, num_classes, num_targets, rng),
    }
    return write_array_dataset(
        out,
        dataset=dataset,
        splits=splits,
        num_classes=num_classes,
        samples_per_shard=samples_per_shard,
        extra_meta={"source": f"synthetic (seed {seed})"},
        progress=progress,
    )
