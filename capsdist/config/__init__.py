"""Typed configuration: schema (dataclasses) and loading (YAML + overrides)."""

from capsdist.config.loading import (
    config_to_dict,
    config_to_yaml,
    field_docs,
    load_config,
    parse_hparams_override,
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
    RayConfig,
    RunConfig,
    TrainConfig,
    ValidateConfig,
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
    "RayConfig",
    "RunConfig",
    "TrainConfig",
    "ValidateConfig",
    "WandbConfig",
    "config_to_dict",
    "config_to_yaml",
    "field_docs",
    "load_config",
    "parse_hparams_override",
    "valid_keys",
]
