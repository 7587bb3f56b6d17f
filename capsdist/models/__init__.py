"""Single-device model code: capsule layers, routing, CapsNet, CNN baselines, losses, and the
plain PyTorch CapsNet (plain.py) that the tests and `capsdist bench model` compare against.

Never imports DeepSpeed, Ray, W&B or webdataset: distribution is applied from outside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from capsdist.config.schema import ModelConfig
from capsdist.models.baseline import BaselineCNN, PaperBaselineCNN
from capsdist.models.capsnet import CapsNet
from capsdist.models.layers import ModelOutput
from capsdist.models.losses import compute_loss, margin_loss, num_correct, reconstruction_loss

MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "capsnet": CapsNet,
    "baseline": BaselineCNN,
    "baseline_paper": PaperBaselineCNN,
}


def build_model(model_config: ModelConfig) -> nn.Module:
    """The model named by `model_config.name`, freshly initialised."""
    return MODELS[model_config.name](model_config)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "CapsNet",
    "ModelOutput",
    "build_model",
    "compute_loss",
    "margin_loss",
    "num_correct",
    "num_parameters",
    "reconstruction_loss",
]
