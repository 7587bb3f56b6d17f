"""From the typed config to data: check the shards fit the model, build the augmentation and
the reader. The one place that maps `data.*` keys to a ShardReader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from capsdist.config.schema import Config, ConfigError
from capsdist.data.augment import Augmentation
from capsdist.data.reader import ShardReader


def check_data_matches_model(meta: dict[str, Any], cfg: Config) -> None:
    """The shards of data.root must be what the model expects; say which key disagrees.

    Images may be larger than model.image_shape (the reader crops them: CIFAR-10 32x32 shards
    feed a 24x24 model), never smaller, and must have the same number of channels.
    """
    root = cfg.data.root
    if meta.get("dataset") != cfg.data.dataset:
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r} but {root}/meta.json holds {meta.get('dataset')!r}"
        )
    for key, want in (
        ("num_classes", cfg.model.num_classes),
        ("num_targets", cfg.model.num_targets),
    ):
        have = meta.get(key)
        if have is not None and have != want:
            raise ConfigError(f"model.{key}={want} but {root}/meta.json has {key}={have}")
    have = meta.get("image_shape")
    want = list(cfg.model.image_shape)
    if have is None or have == want:
        return
    h, w, c = have
    if c != want[2] or h < want[0] or w < want[1]:
        raise ConfigError(
            f"model.image_shape={want} but {root}/meta.json has image_shape={have}: the reader "
            f"can only crop to a smaller size with the same channels"
        )


def check_extra_eval_root(meta: dict[str, Any], root: str, cfg: Config) -> None:
    """A data.extra_eval_roots folder may hold another data set (affNIST beside expanded MNIST)
    but must fit the model: same classes and targets, images at least as large, same channels."""
    want = list(cfg.model.image_shape)
    h, w, c = meta["image_shape"]
    if meta["num_classes"] != cfg.model.num_classes or meta["num_targets"] != cfg.model.num_targets:
        raise ConfigError(
            f"data.extra_eval_roots: {root}/meta.json has {meta['num_classes']} classes, "
            f"{meta['num_targets']} target(s); the model {cfg.model.num_classes}, "
            f"{cfg.model.num_targets}"
        )
    if c != want[2] or h < want[0] or w < want[1]:
        raise ConfigError(
            f"data.extra_eval_roots: {root}/meta.json has image_shape={meta['image_shape']}, "
            f"which cannot be cropped to model.image_shape={want}"
        )


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
    meta: dict[str, Any],
    *,
    train: bool,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    max_examples: int = 0,
    root: str | Path | None = None,
) -> ShardReader:
    """A ShardReader for `split` of `root` (default data.root), whose `meta` (from `read_meta`)
    the caller has already read, with cfg's augmentation, shuffling, workers and error handling,
    data.cache_dir, and data.shards for the training split of data.root."""
    override = cfg.data.shards if root is None and split == cfg.data.train_split else ""
    return ShardReader(
        root or cfg.data.root,
        split,
        meta,
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
        shards=override,
        cache_dir=cfg.data.cache_dir,
    )
