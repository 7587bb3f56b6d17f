"""The convolutional baselines the paper compares against.

`baseline`: the reference code's CNN (models/conv_model.py): conv 5x5 512 → pool → conv 5x5 256 →
pool → FC 1024 → FC classes. `baseline_paper`: the paper's MNIST baseline (section 5): three 5x5
convs of 256, 256, 128 channels, FC 328, FC 192, dropout, classes: 35.4 M parameters on MNIST.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from capsdist.config.schema import ModelConfig
from capsdist.models.layers import ModelOutput


class BaselineCNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, w, c = cfg.image_shape
        pooled = (h // 4) * (w // 4)  # two 2x2 stride-2 pools
        self.net = nn.Sequential(
            nn.Conv2d(c, 512, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(512, 256, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256 * pooled, 1024),
            nn.ReLU(),
            nn.Linear(1024, cfg.num_classes),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        return ModelOutput(lengths=self.net(images))


class PaperBaselineCNN(nn.Module):
    def __init__(self, cfg: ModelConfig, dropout: float = 0.5):
        super().__init__()
        h, w, c = cfg.image_shape
        self.net = nn.Sequential(
            nn.Conv2d(c, 256, 5, padding=2),
            nn.ReLU(),
            nn.Conv2d(256, 256, 5, padding=2),
            nn.ReLU(),
            nn.Conv2d(256, 128, 5, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(128 * h * w, 328),
            nn.ReLU(),
            nn.Linear(328, 192),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(192, cfg.num_classes),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        return ModelOutput(lengths=self.net(images))
