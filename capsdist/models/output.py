"""What every model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    lengths: torch.Tensor
    """(B, J) class scores: capsule lengths for a CapsNet, logits for a CNN baseline."""
    reconstruction: torch.Tensor | None = None
    """(B, C, H, W) for one target, (B, T, C, H, W) for T targets; None without a decoder."""
    poses: torch.Tensor | None = None
    """(B, J, D) class capsules (CapsNet only)."""
    coupling: torch.Tensor | None = None
    """(B, I, J) coupling coefficients of the last routing iteration (CapsNet only)."""

    def predictions(self, num_targets: int = 1) -> torch.Tensor:
        """(B,) top class, or (B, T) the top-T classes (sorted ascending) for T targets."""
        if num_targets == 1:
            return self.lengths.argmax(dim=-1)
        return self.lengths.topk(num_targets, dim=-1).indices.sort(dim=-1).values
