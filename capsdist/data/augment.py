"""Batch augmentation as whole-tensor torch ops on the reader's device (no per-image Python loop).

The reference (Sabour et al. 2017, `input_data/mnist`) trains on MNIST shifted by up to 2 px in
each direction with zero fill; a fresh random integer shift per image and axis is the on-line
equivalent of its 25 pre-shifted copies.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def crop_offsets(
    batch: int, size: tuple[int, int], crop: tuple[int, int], train: bool, generator=None
) -> torch.Tensor:
    """Top-left corners (B, 2) of the crops: uniform at random when training, else centred."""
    (h, w), (ch, cw) = size, crop
    if not train:
        return torch.tensor([(h - ch) // 2, (w - cw) // 2]).expand(batch, 2)
    ys = torch.randint(0, h - ch + 1, (batch,), generator=generator)
    xs = torch.randint(0, w - cw + 1, (batch,), generator=generator)
    return torch.stack([ys, xs], 1)


def crop_images(images: torch.Tensor, offsets: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Cut (ch, cw) windows at each image's own offset: (B, ..., H, W, C) → (B, ..., ch, cw, C).

    Works on the uint8 HWC batches before conversion (4x fewer bytes to move), with one gather.
    """
    b = images.shape[0]
    offsets = offsets.to(images.device)
    rows = offsets[:, :1] + torch.arange(crop[0], device=images.device)  # (B, ch)
    cols = offsets[:, 1:] + torch.arange(crop[1], device=images.device)  # (B, cw)
    lead = images.shape[1:-3]  # e.g. (T,) for reconstruction targets
    flat = images.reshape(b, -1, *images.shape[-3:])  # (B, L, H, W, C)
    index_b = torch.arange(b, device=images.device)[:, None, None, None]
    index_l = torch.arange(flat.shape[1], device=images.device)[None, :, None, None]
    out = flat[index_b, index_l, rows[:, None, :, None], cols[:, None, None, :]]
    return out.reshape(b, *lead, crop[0], crop[1], images.shape[-1])


def standardize(images: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation as TensorFlow's `per_image_standardization` (the reference):
    (x - mean) / max(std, 1/sqrt(N)) over each image's C*H*W values."""
    flat = images.flatten(1)
    mean = flat.mean(1)
    std = flat.std(1, correction=0).clamp_min(flat.shape[1] ** -0.5)
    return (images - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)


@dataclass(frozen=True)
class Augmentation:
    """What the reader does to a batch on its device; every random draw comes from one seeded
    generator per batch, so a resumed run sees the very same images.

    Geometric steps (crop, shift, flip) move reconstruction targets (MultiMNIST's source
    digits) with their image; photometric ones (brightness, contrast, standardisation) do not.
    The reference's CIFAR-10 / smallNORB training: random crop, flip (CIFAR-10 only),
    brightness ±63 (of 255), contrast 0.2-1.8, per-image standardisation; evaluation: centre
    crop + standardisation.
    """

    crop: tuple[int, int] | None = None
    """(h, w) of the crop; random when training, centred at evaluation; None = whole image."""
    shift_pixels: int = 0
    """±pixels of random translation per axis with zero fill (training only)."""
    flip: bool = False
    """Random left-right flips (training only)."""
    brightness: float = 0.0
    """Random brightness delta, uniform in ±brightness on the 0-255 scale (training only)."""
    contrast: tuple[float, float] | None = None
    """Random contrast factor range (training only), around each channel's mean."""
    standardize: bool = False
    """Per-image standardisation (training and evaluation)."""

    def __call__(
        self,
        images: torch.Tensor,
        recon: torch.Tensor | None,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 images (B, H, W, C) [+ recon (B, T, H, W, C)] on the device → float32
        (B, C, H, W) [+ (B, T, C, H, W)], pixels / 255 before the photometric steps."""
        b = images.shape[0]
        if self.crop is not None and tuple(images.shape[1:3]) != self.crop:
            offsets = crop_offsets(b, images.shape[1:3], self.crop, train, generator)
            images = crop_images(images, offsets, self.crop)
            recon = None if recon is None else crop_images(recon, offsets, self.crop)
        x = _to_float_bchw(images)  # (B, C, H, W)
        r = (
            None
            if recon is None
            else _to_float_bchw(recon.flatten(0, 1)).unflatten(0, recon.shape[:2])
        )
        if not train:
            return (standardize(x) if self.standardize else x), r
        c = x.shape[1]
        if self.shift_pixels or self.flip:
            # Geometric steps run once over image and targets stacked along the channels.
            both = x if r is None else torch.cat([x, r.flatten(1, 2)], 1)  # (B, C + T*C, H, W)
            if self.shift_pixels:
                both = shift_images(both, draw_shifts(b, self.shift_pixels, generator))
            if self.flip:
                flips = (torch.rand(b, generator=generator) < 0.5).to(both.device)
                both = torch.where(flips[:, None, None, None], both.flip(-1), both)
            x = both[:, :c]
            r = None if r is None else both[:, c:].unflatten(1, (-1, c))
        if self.brightness:
            delta = (torch.rand(b, generator=generator) * 2 - 1) * (self.brightness / 255)
            x = x + delta.to(x.device).view(b, 1, 1, 1)
        if self.contrast is not None:
            low, high = self.contrast
            factor = (torch.rand(b, generator=generator) * (high - low) + low).to(x.device)
            mean = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1), as tf.image.adjust_contrast
            x = (x - mean) * factor.view(b, 1, 1, 1) + mean
        if self.standardize:
            x = standardize(x)
        return x.contiguous(), r

    @property
    def random(self) -> bool:
        """Whether training draws anything (else no generator is needed)."""
        return bool(self.crop or self.shift_pixels or self.flip or self.brightness or self.contrast)


def _to_float_bchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) → float32 (B, C, H, W) in [0, 1], contiguous."""
    x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(255)
