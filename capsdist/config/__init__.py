"""Typed configuration: schema (dataclasses) and loading (YAML + overrides)."""

from capsdist.config.loading import (
    config_to_yaml,
    load_config,
    parse_hparams_override,
    save_config,
    valid_keys,
)
from capsdist.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "WandbConfig",
    "config_to_yaml",
    "load_config",
    "parse_hparams_override",
    "save_config",
    "valid_keys",
]
