"""Batch augmentation as whole-tensor torch ops (no per-image Python loop).

The reference (Sabour et al. 2017, `input_data/mnist`) trains on MNIST shifted by up to 2 px in
each direction with zero fill; a fresh random integer shift per image and axis is the on-line
equivalent of its 25 pre-shifted copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_shifts(
    batch: int, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Integer shifts (B, 2) = (dy, dx), each uniform in [-max_shift, max_shift]."""
    return torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each image by its own (dy, dx) with zero fill; pixels moved out are dropped.

    images: (B, C, H, W); shifts: (B, 2) integers with |shift| < H, W. Positive dy moves content
    down, positive dx moves it right: out[b, :, y, x] = images[b, :, y - dy, x - dx].
    """
    b, c, h, w = images.shape
    pad = int(shifts.abs().max()) if shifts.numel() else 0
    if pad == 0:
        return images
    shifts = shifts.to(images.device)
    padded = F.pad(images, (pad, pad, pad, pad)).flatten(2)  # (B, C, (H+2p)(W+2p)), zeros around
    rows = torch.arange(h, device=images.device) + pad - shifts[:, :1]  # (B, H)
    cols = torch.arange(w, device=images.device) + pad - shifts[:, 1:]  # (B, W)
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).flatten(1)  # (B, H*W)
    # One gather over the flattened padded images (faster than two per-axis gathers).
    return padded.gather(2, index[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


def random_shift(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shift every image of (B, C, H, W) by its own random integer (dy, dx) in ±max_shift.

    Zero fill; max_shift 0 returns `images` unchanged. The draw comes from `generator`, so a
    seeded generator gives the same shifts as `draw_shifts` with an identically seeded one.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    return shift_images(images, draw_shifts(images.shape[0], max_shift, generator))
