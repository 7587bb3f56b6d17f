"""Data sets made from MNIST shards: MultiMNIST, expanded MNIST and affNIST-like.

MultiMNIST and expanded MNIST redo the reference's shift tool (`mnist_shift.py`).

MultiMNIST (`--shift 6 --pad 4 --pairs N`): every digit is padded by 4 to 36x36 and shifted by
its own random integer (dy, dx) in -6..6 with zero fill. For each base image the reference
draws 2N other images without replacement, keeps those of a DIFFERENT class and takes the first
N; each pair becomes one sample: the merged image min(base + other, 255), both labels (base
first) and both shifted digits (`recon.u8`, (2, 36, 36, 1)), which the decoder reconstructs
from the capsule of their own label. Train pairs come from MNIST's train split, test pairs from
its test split (paper: 60,000 x 1,000 and 10,000 x 1,000). Samples are written pair-round by
pair-round (round j holds the j-th pair of every base), so consecutive samples have different
base digits and a shuffle buffer sees a mix.

Expanded MNIST (`--shift 6 --pad 6`): each digit padded to 40x40 and placed at a random shift,
`--copies` times: the training set of the affNIST generalisation experiment.

affNIST-like (`capsdist data affnist-like`): when the real affNIST (`capsdist data affnist`) is
not at hand, MNIST's test split warped the way affNIST describes its own construction: padded
to 40x40, rotated by up to ±20°, sheared by up to ±45°, scaled by 0.8-1.2 on each axis, then
translated at random as far as the warped digit stays inside the frame. It is a stand-in and is
named `affnist_like` everywhere, so that no figure from it can pass for an affNIST result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from capsdist.data import read_meta, read_split_arrays
from capsdist.data.augment import shift_images
from capsdist.data.urls import describe
from data_tools.shards import DataToolError, write_array_dataset, write_dataset

CHUNK = 10_000  # samples generated at once (~40 MB for MultiMNIST)
AFFNIST_SIZE = 40


def read_mnist(
    src: str | Path, splits: tuple[str, ...] = ("train", "test")
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(meta, {split: (uint8 images (N, 28, 28, 1), int64 labels (N,))}) of the MNIST shards in
    `src`, every shard checked; DataToolError if `src` holds another data set."""
    meta = read_meta(src)
    if meta["dataset"] != "mnist" or meta["num_targets"] != 1:
        raise DataToolError(
            f"{src}: holds {meta['dataset']!r} with {meta['num_targets']} target(s); "
            f"--src must be 'mnist' shards from `capsdist data mnist ...`"
        )
    return meta, {split: read_split_arrays(src, split, meta) for split in splits}


def pad_and_shift(images: np.ndarray, pad: int, shifts: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, C) → (n, H+2p, W+2p, C), each moved by its (dy, dx), zero fill."""
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    x = torch.from_numpy(padded).permute(0, 3, 1, 2)  # (n, C, H, W)
    return shift_images(x, torch.from_numpy(shifts)).permute(0, 2, 3, 1).numpy()


def choose_partners(labels: np.ndarray, pairs: int, rng: np.random.Generator) -> np.ndarray:
    """(N, pairs) partner indices: per base, 2*pairs others drawn without replacement, those of
    another class kept, the first `pairs` taken (drawing again in the rare case of too few)."""
    n = len(labels)
    if pairs > n - 1:
        raise DataToolError(f"--pairs {pairs} is more than the {n - 1} other images of the split")
    others = n - np.bincount(labels).max()  # images outside the largest class
    if others < pairs:
        raise DataToolError(
            f"--pairs {pairs}: some class has only {others} partners of another class"
        )
    partners = np.empty((n, pairs), dtype=np.int64)
    size = min(2 * pairs, n - 1)
    for i in range(n):
        draw = rng.choice(n - 1, size=size, replace=False)
        draw = draw + (draw >= i)  # never the base itself
        kept = draw[labels[draw] != labels[i]]
        while len(kept) < pairs:  # rare: fewer than half of the draw had another class
            more = rng.choice(n - 1, size=size, replace=False)
            more = more + (more >= i)
            more = more[(labels[more] != labels[i]) & ~np.isin(more, kept)]
            kept = np.concatenate([kept, more])
        partners[i] = kept[:pairs]
    return partners


def _multi_chunks(images, labels, partners, shift, pad, rng) -> Iterator[tuple]:
    n, pairs = partners.shape
    for start in range(0, n * pairs, CHUNK):
        flat = np.arange(start, min(start + CHUNK, n * pairs))
        j_idx, base = flat // n, flat % n  # pair-round major: round j, then every base
        other = partners[base, j_idx]
        m = len(base)
        a = pad_and_shift(images[base], pad, rng.integers(-shift, shift + 1, (m, 2)))
        b = pad_and_shift(images[other], pad, rng.integers(-shift, shift + 1, (m, 2)))
        merged = np.minimum(a.astype(np.uint16) + b, 255).astype(np.uint8)
        yield merged, np.stack([labels[base], labels[other]], 1), np.stack([a, b], 1)


def _write_derived(
    out: str | Path,
    *,
    dataset: str,
    kind: str,
    what: str,
    src: str | Path,
    source_meta: dict,
    splits: dict,
    samples_per_shard: int,
    progress: bool,
    **params: Any,
) -> dict[str, Any]:
    """Write a data set made from MNIST shards: its generation `params` both go into meta.json
    and, with the source's own fingerprint, make this set's fingerprint (same inputs and
    params: the same shards, so a rerun is recognised)."""
    text = json.dumps([kind, source_meta.get("fingerprint"), params], sort_keys=True)
    return write_dataset(
        out,
        dataset=dataset,
        fingerprint=hashlib.sha256(text.encode()).hexdigest(),
        splits=splits,
        num_classes=source_meta["num_classes"],
        samples_per_shard=samples_per_shard,
        extra_meta={"source": f"{what} from {describe(src)}", **params},
        progress=progress,
    )


def make_multimnist(
    src: str | Path,
    out: str | Path,
    *,
    shift: int = 6,
    pad: int = 4,
    pairs: int = 1000,
    seed: int = 0,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """MNIST shards in `src` → `multimnist` shards (both splits, `pairs` per base image)."""
    if shift < 0 or pad < 0 or pairs < 1:
        raise DataToolError(
            f"need --shift >= 0, --pad >= 0, --pairs >= 1; got {shift}, {pad}, {pairs}"
        )
    meta, mnist = read_mnist(src)
    data = {}
    for split_id, (split, (images, labels)) in enumerate(mnist.items()):
        rng = np.random.default_rng([seed, split_id])
        data[split] = (images, labels, choose_partners(labels, pairs, rng), rng)

    def chunks(split):
        images, labels, partners, rng = data[split]
        return lambda: _multi_chunks(images, labels, partners, shift, pad, rng)

    return _write_derived(
        out,
        dataset="multimnist",
        kind="multimnist",
        what="MultiMNIST",
        src=src,
        source_meta=meta,
        splits={split: (len(d[0]) * pairs, chunks(split)) for split, d in data.items()},
        samples_per_shard=samples_per_shard,
        progress=progress,
        shift=shift,
        pad=pad,
        pairs=pairs,
        seed=seed,
    )


def make_expanded_mnist(
    src: str | Path,
    out: str | Path,
    *,
    shift: int = 6,
    pad: int = 6,
    copies: int = 1,
    seed: int = 0,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """MNIST shards in `src` → `expanded_mnist` shards: 40x40, digits randomly placed."""
    if shift < 0 or pad < 0 or copies < 1 or shift > pad:
        raise DataToolError(
            f"need 0 <= --shift <= --pad and --copies >= 1; got {shift}, {pad}, {copies}"
        )
    meta, mnist = read_mnist(src)
    data = {
        split: (images, labels, np.random.default_rng([seed, split_id]))
        for split_id, (split, (images, labels)) in enumerate(mnist.items())
    }

    def chunks(split):
        images, labels, rng = data[split]
        index = np.tile(np.arange(len(images)), copies)

        def generate():
            for start in range(0, len(index), CHUNK):
                part = index[start : start + CHUNK]
                shifts = rng.integers(-shift, shift + 1, (len(part), 2))
                yield pad_and_shift(images[part], pad, shifts), labels[part], None

        return generate

    return _write_derived(
        out,
        dataset="expanded_mnist",
        kind="expanded",
        what="expanded MNIST",
        src=src,
        source_meta=meta,
        splits={split: (len(d[0]) * copies, chunks(split)) for split, d in data.items()},
        samples_per_shard=samples_per_shard,
        progress=progress,
        shift=shift,
        pad=pad,
        copies=copies,
        seed=seed,
    )


def affine_warp(
    images: np.ndarray, rng: np.random.Generator, rotation=20.0, shear=45.0, scale=(0.8, 1.2)
) -> np.ndarray:
    """uint8 (n, 28, 28, 1) → (n, 40, 40, 1): padded, warped about the centre, then moved by
    a random integer translation that keeps every lit pixel inside the frame."""
    n = len(images)
    pad = (AFFNIST_SIZE - images.shape[1]) // 2
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
    idx = torch.arange(AFFNIST_SIZE)
    top = torch.where(rows, idx, AFFNIST_SIZE).amin(1)
    bottom = torch.where(rows, idx, -1).amax(1)
    left = torch.where(cols, idx, AFFNIST_SIZE).amin(1)
    right = torch.where(cols, idx, -1).amax(1)
    empty = bottom < 0  # a blank image: any shift is fine, use none
    u = torch.from_numpy(rng.random((n, 2)))
    lo = torch.stack([-top, -left], 1)
    hi = torch.stack([AFFNIST_SIZE - 1 - bottom, AFFNIST_SIZE - 1 - right], 1)
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
    meta, mnist = read_mnist(src, ("test",))
    images, labels = mnist["test"]
    rng = np.random.default_rng(seed)
    warped = np.concatenate(
        [affine_warp(images[i : i + 5000], rng) for i in range(0, len(images), 5000)]
    )
    return write_array_dataset(
        out,
        dataset="affnist_like",
        splits={"test": (warped, labels)},
        num_classes=meta["num_classes"],
        samples_per_shard=samples_per_shard,
        extra_meta={
            "source": f"affNIST-like warp of the MNIST test split in {describe(src)} (NOT affNIST)",
            "warp": "rotation ±20°, shear ±45°, scale 0.8-1.2 per axis, translation in frame",
            "seed": seed,
        },
        progress=progress,
    )
