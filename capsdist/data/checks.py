"""Checks that the shards on disk are what a config expects, before anything is written."""

from __future__ import annotations

from capsdist.config.schema import Config, ConfigError


def check_data_matches_model(meta: dict, cfg: Config) -> None:
    """The shards must be what the model expects; say which key disagrees.

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


def check_extra_eval_root(meta: dict, root: str, cfg: Config) -> None:
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
