"""What the model files share: the output every model returns, the capsule nonlinearity, and
convolutions padded as TensorFlow pads them (the reference code is TF 1).

Shape legend used across capsdist/models: B batch, I input capsules, J output capsules (classes),
D pose dimensions (Din of an input capsule, Dout of an output capsule), R routing iterations,
T targets (digits per image: 1, or 2 for MultiMNIST).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Inside the square root so that ‖0‖ has a finite gradient. The reference divides by ‖s‖ with no
# epsilon and produces NaN for an all-zero capsule (a known failure of public ports).
NORM_EPS = 1e-9


@dataclass
class ModelOutput:
    """What every model's forward returns."""

    lengths: torch.Tensor
    """(B, J) class scores: capsule lengths for a CapsNet, logits for a CNN baseline."""
    reconstruction: torch.Tensor | None = None
    """(B, C, H, W) for one target, (B, T, C, H, W) for T targets, slot t reconstructing label t
    (or, without labels, the t-th of `predictions(T)`); None without a decoder."""
    poses: torch.Tensor | None = None
    """(B, J, D) class capsules (CapsNet only)."""
    coupling: torch.Tensor | None = None
    """(B, I, J) coupling coefficients of the last routing iteration (CapsNet only)."""

    def predictions(self, num_targets: int = 1) -> torch.Tensor:
        """(B,) top class, or (B, T) the top-T classes (sorted ascending) for T targets."""
        if num_targets == 1:
            return self.lengths.argmax(dim=-1)
        return self.lengths.topk(num_targets, dim=-1).indices.sort(dim=-1).values


def safe_norm(s: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """sqrt(Σ s² + eps): the vector length, differentiable at 0."""
    return torch.sqrt(s.pow(2).sum(dim=dim, keepdim=keepdim) + NORM_EPS)


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """v = ‖s‖² / (1 + ‖s‖²) · s / ‖s‖ (Sabour et al. eq. 1): same direction, length in [0, 1)."""
    norm_sq = s.pow(2).sum(dim=dim, keepdim=True)
    return s * (norm_sq / ((1.0 + norm_sq) * torch.sqrt(norm_sq + NORM_EPS)))


def tf_padding(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """(before, after) padding of one axis with TensorFlow's VALID/SAME rule (SAME may be
    asymmetric for stride 2, which PyTorch's `padding="same"` does not support)."""
    if padding == "VALID":
        return 0, 0
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    before, after = tf_padding(size, kernel, stride, padding)
    return (size + before + after - kernel) // stride + 1


class TFConv2d(nn.Conv2d):
    """Conv2d with TensorFlow VALID/SAME padding for a known input size."""

    def __init__(self, in_ch, out_ch, kernel, stride, padding, in_hw, bias=True):
        super().__init__(in_ch, out_ch, kernel, stride, bias=bias)
        pad_h = tf_padding(in_hw[0], kernel, stride, padding)
        pad_w = tf_padding(in_hw[1], kernel, stride, padding)
        self.pad = (pad_w[0], pad_w[1], pad_h[0], pad_h[1])
        self.out_hw = (
            conv_output_size(in_hw[0], kernel, stride, padding),
            conv_output_size(in_hw[1], kernel, stride, padding),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad) if any(self.pad) else x)
