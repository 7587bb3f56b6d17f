"""affNIST (the real test set) and an affNIST-like set warped from MNIST, both 40x40.

`capsdist data affnist`: affNIST's transformed `test.mat` (or `test.mat.zip`, or a folder of
`*.mat` batches), a MATLAB file whose struct `affNISTdata` holds `image` (1600, N) uint8, one
40x40 image per column in row-major order, and `label_int` (N,). Read with scipy.

`capsdist data affnist-like`: when the real affNIST is not at hand, MNIST's test split warped
the way affNIST describes its own construction: padded to 40x40, rotated by up to ±20°, sheared
by up to ±45°, scaled by 0.8-1.2 on each axis, then translated at random as far as the warped
digit stays inside the frame. It is a stand-in and is named `affnist_like` everywhere, so that
no figure from it can pass for an affNIST result.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from capsdist.data.augment import shift_images
from data_tools.download import safe_extract
from data_tools.errors import DataToolError
from data_tools.from_shards import load_split
from data_tools.output import write_array_dataset
from data_tools.sources import resolve_src

NUM_CLASSES = 10
SIZE = 40


def read_affnist_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One affNIST .mat file → (uint8 (N, 40, 40, 1), int64 labels (N,))."""
    from scipy.io import loadmat  # heavy import, only needed here

    try:
        struct = loadmat(path, squeeze_me=True, struct_as_record=False)["affNISTdata"]
        columns = np.asarray(struct.image, dtype=np.uint8)
        labels = np.asarray(struct.label_int, dtype=np.int64).reshape(-1)
    except (OSError, ValueError, KeyError, AttributeError, TypeError, NotImplementedError) as exn:
        raise DataToolError(f"{path}: not an affNIST .mat file ({exn})") from exn
    columns = columns.reshape(SIZE * SIZE, -1)
    if len(labels) != columns.shape[1] or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataToolError(
            f"{path}: {columns.shape[1]} images but labels {labels.shape} not in 0-9"
        )
    return np.ascontiguousarray(columns.T.reshape(-1, SIZE, SIZE, 1)), labels


def _mat_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    for name in ("test.mat",):
        if (root / name).is_file():
            return [root / name]
    files = sorted(root.glob("**/*.mat"), key=lambda p: (len(p.stem), p.stem))
    if not files:
        raise DataToolError(f"{root}: no affNIST .mat file (test.mat or numbered batches)")
    return files


def make_affnist(
    src: str | Path | None,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """affNIST's transformed test set (`src`: .mat, .mat.zip or folder; None: download) →
    `affnist` shards with one `test` split."""
    src = resolve_src("affnist", src, out, mirror=mirror, progress=progress)
    if src.is_dir() and not list(src.glob("**/*.mat")) and (src / "test.mat.zip").is_file():
        src = src / "test.mat.zip"
    scratch = None
    try:
        root = src
        if src.is_file() and src.suffix == ".zip":
            Path(out).mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=out))
            root = safe_extract(src, scratch)
        parts = [read_affnist_mat(p) for p in _mat_files(root)]
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return write_array_dataset(
        out,
        dataset="affnist",
        splits={"test": (images, labels)},
        num_classes=NUM_CLASSES,
        samples_per_shard=samples_per_shard,
        extra_meta={"source": f"affNIST from {src.resolve()}"},
        progress=progress,
    )


def affine_warp(
    images: np.ndarray, rng: np.random.Generator, rotation=20.0, shear=45.0, scale=(0.8, 1.2)
) -> np.ndarray:
    """uint8 (n, 28, 28, 1) → (n, 40, 40, 1): padded, warped about the centre, then moved by
    a random integer translation that keeps every lit pixel inside the frame."""
    n = len(images)
    pad = (SIZE - images.shape[1]) // 2
    x = torch.from_numpy(np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))))
    x = x.permute(0, 3, 1, 2).float() / 255  # (n, 1, 40, 40)
    rot = np.deg2rad(rng.uniform(-rotation, rotation, n))
    shr = np.tan(np.deg2rad(rng.uniform(-shear, shear, n)))
    sx, sy = rng.uniform(*scale, n), rng.uniform(*scale, n)
    cos, sin = np.cos(rot), np.sin(rot)
    # forward map A = R @ Shear @ Scale; grid_sample needs output → input, i.e. A^-1.
    a = np.stack(
        [
            np.stack([cos * sx, (cos * shr - sin) * sy], 1),
            np.stack([sin * sx, (sin * shr + cos) * sy], 1),
        ],
        1,
    )  # (n, 2, 2)
    theta = np.concatenate([np.linalg.inv(a), np.zeros((n, 2, 1))], 2)
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = (warped * 255).round().clamp(0, 255).to(torch.uint8)  # (n, 1, 40, 40)
    lit = warped[:, 0] > 0
    rows, cols = lit.any(2), lit.any(1)  # (n, 40) each
    idx = torch.arange(SIZE)
    top = torch.where(rows, idx, SIZE).amin(1)
    bottom = torch.where(rows, idx, -1).amax(1)
    left = torch.where(cols, idx, SIZE).amin(1)
    right = torch.where(cols, idx, -1).amax(1)
    empty = bottom < 0  # a blank image: any shift is fine, use none
    u = torch.from_numpy(rng.random((n, 2)))
    lo = torch.stack([-top, -left], 1)
    hi = torch.stack([SIZE - 1 - bottom, SIZE - 1 - right], 1)
    shifts = (lo + (u * (hi - lo + 1)).floor().long()).clamp(max=hi)
    shifts[empty] = 0
    return shift_images(warped, shifts).permute(0, 2, 3, 1).numpy().copy()


def make_affnist_like(
    src: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """MNIST shards in `src` → `affnist_like` shards: its test split, affine-warped to 40x40."""
    images, labels, _ = load_split(src, "test")
    rng = np.random.default_rng(seed)
    warped = np.concatenate(
        [affine_warp(images[i : i + 5000], rng) for i in range(0, len(images), 5000)]
    )
    return write_array_dataset(
        out,
        dataset="affnist_like",
        splits={"test": (warped, labels)},
        num_classes=NUM_CLASSES,
        samples_per_shard=samples_per_shard,
        extra_meta={
            "source": f"affNIST-like warp of the MNIST test split in {Path(src).resolve()} "
            f"(NOT affNIST)",
            "warp": "rotation ±20°, shear ±45°, scale 0.8-1.2 per axis, translation in frame",
            "seed": seed,
        },
        progress=progress,
    )
