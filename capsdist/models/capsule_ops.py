"""Elementwise capsule operations: squash and a capsule's length, both safe at the zero vector.

Shape legend used across capsdist/models: B batch, I input capsules, J output capsules (classes),
D pose dimensions (Din of an input capsule, Dout of an output capsule), R routing iterations.
"""

from __future__ import annotations

import torch

# Inside the square root so that ‖0‖ has a finite gradient. The reference divides by ‖s‖ with no
# epsilon and produces NaN for an all-zero capsule (a known failure of public ports).
NORM_EPS = 1e-9


def safe_norm(s: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """sqrt(Σ s² + eps): the vector length, differentiable at 0."""
    return torch.sqrt(s.pow(2).sum(dim=dim, keepdim=keepdim) + NORM_EPS)


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """v = ‖s‖² / (1 + ‖s‖²) · s / ‖s‖ (Sabour et al. eq. 1): same direction, length in [0, 1)."""
    norm_sq = s.pow(2).sum(dim=dim, keepdim=True)
    return s * (norm_sq / ((1.0 + norm_sq) * torch.sqrt(norm_sq + NORM_EPS)))
