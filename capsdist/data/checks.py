"""Checks that the shards on disk are what a config expects, before anything is written."""

from __future__ import annotations

from capsdist.config.schema import Config, ConfigError


def check_data_matches_model(meta: dict, cfg: Config) -> None:
    """The shards must be what the model expects; say which key disagrees."""
    root = cfg.data.root
    if meta.get("dataset") != cfg.data.dataset:
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r} but {root}/meta.json holds {meta.get('dataset')!r}"
        )
    expected = {
        "num_classes": cfg.model.num_classes,
        "num_targets": cfg.model.num_targets,
        "image_shape": list(cfg.model.image_shape),
    }
    for key, want in expected.items():
        have = meta.get(key)
        if have is not None and have != want:
            raise ConfigError(f"model.{key}={want} but {root}/meta.json has {key}={have}")
