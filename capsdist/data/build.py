"""Readers built from the typed config: the one place that maps `data.*` keys to a ShardReader."""

from __future__ import annotations

from pathlib import Path

import torch

from capsdist.config.schema import Config
from capsdist.data.augment import Augmentation
from capsdist.data.meta import read_meta
from capsdist.data.reader import ShardReader


def build_augmentation(cfg: Config, meta_image_shape: list[int]) -> Augmentation:
    """The augmentation cfg.data asks for; crops to model.image_shape when the shards are larger
    (CIFAR-10 32x32 → 24x24, smallNORB 48x48 → 32x32: random in training, centred at eval)."""
    data = cfg.data
    want = tuple(cfg.model.image_shape[:2])
    return Augmentation(
        crop=want if tuple(meta_image_shape[:2]) != want else None,
        shift_pixels=data.shift_pixels,
        flip=data.flip,
        brightness=data.brightness,
        contrast=tuple(data.contrast) if data.contrast else None,
        standardize=data.standardize,
    )


def build_reader(
    cfg: Config,
    split: str,
    *,
    train: bool,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    max_examples: int = 0,
    root: str | Path | None = None,
) -> ShardReader:
    """A ShardReader for `split` of `root` (default data.root) with cfg's augmentation,
    shuffling, workers and error handling."""
    root = root or cfg.data.root
    meta = read_meta(root)
    return ShardReader(
        root,
        split,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        train=train,
        shuffle_buffer=cfg.data.shuffle_buffer,
        num_workers=cfg.data.num_workers if train else 0,
        max_examples=max_examples,
        device=device,
        augment=build_augmentation(cfg, meta["image_shape"]),
        on_error=cfg.data.on_error,
    )
