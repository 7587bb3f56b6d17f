"""random_shift: whole-batch integer translation with zero fill."""

import pytest
import torch

from capsdist.data import random_shift
from capsdist.data.augment import draw_shifts, shift_images


def test_single_pixel_moves_by_exactly_the_drawn_shift():
    b, s = 256, 3
    images = torch.zeros(b, 1, 28, 28)
    images[:, 0, 14, 10] = 1.0
    out = random_shift(images, s, torch.Generator().manual_seed(7))
    shifts = draw_shifts(b, s, torch.Generator().manual_seed(7))  # the same draw
    assert shifts.abs().max() <= s and set(shifts.flatten().tolist()) == set(range(-s, s + 1))
    found = out[:, 0].flatten(1).argmax(1)
    assert torch.equal(found // 28, 14 + shifts[:, 0]) and torch.equal(
        found % 28, 10 + shifts[:, 1]
    )
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(b))  # nothing else lit: zero fill


def test_zero_fill_and_dropped_pixels():
    images = torch.ones(2, 3, 8, 8)
    out = shift_images(images, torch.tensor([[2, -1], [0, 0]]))
    assert torch.equal(out[1], images[1])
    assert (out[0, :, :2] == 0).all() and (out[0, :, :, -1:] == 0).all()  # vacated: zeros
    assert out[0].sum() == 3 * 6 * 7  # the rest is still ones


def test_matches_a_slow_reference():
    images = torch.rand(5, 2, 6, 7)
    shifts = torch.tensor([[1, 2], [-2, 0], [0, -3], [2, 2], [-1, -1]])
    out = shift_images(images, shifts)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        expected = torch.zeros(2, 6, 7)
        for y in range(6):
            for x in range(7):
                if 0 <= y - dy < 6 and 0 <= x - dx < 7:
                    expected[:, y, x] = images[i, :, y - dy, x - dx]
        assert torch.equal(out[i], expected)


def test_shift_zero_is_identity():
    images = torch.rand(4, 1, 28, 28)
    assert torch.equal(random_shift(images, 0, torch.Generator().manual_seed(0)), images)
    with pytest.raises(ValueError):
        random_shift(images, -1)


def _ramp(b=4, h=32, w=32, c=3):
    """uint8 (B, H, W, C) whose pixel value encodes its column: easy to locate after a crop."""
    cols = torch.arange(w, dtype=torch.uint8).view(1, 1, w, 1)
    return cols.expand(b, h, w, c).clone()


def test_crops_are_random_in_training_and_centred_at_evaluation():
    from capsdist.data.augment import Augmentation

    aug = Augmentation(crop=(24, 24))
    images = _ramp(b=64)
    x, _ = aug(images, None, train=False)
    assert x.shape == (64, 3, 24, 24)
    assert torch.all(x[:, :, :, 0] * 255 == 4)  # centre: columns 4..27
    y, _ = aug(images, None, train=True, generator=torch.Generator().manual_seed(0))
    first = (y[:, 0, 0, 0] * 255).round().long()
    assert first.min() >= 0 and first.max() <= 8 and len(set(first.tolist())) > 3


def test_flip_brightness_contrast_standardize_and_targets_follow_geometry():
    from capsdist.data.augment import Augmentation, standardize

    images = _ramp(b=256, h=8, w=8, c=1)
    recon = torch.stack([images, images], 1)  # (B, 2, H, W, C): must move with the image
    aug = Augmentation(flip=True, shift_pixels=1, brightness=63, contrast=(0.2, 1.8))
    x, r = aug(images, recon, train=True, generator=torch.Generator().manual_seed(1))
    assert r.shape == (256, 2, 1, 8, 8)
    flipped = r[:, 0, 0, 4, 1] > r[:, 0, 0, 4, 6]  # column order reversed
    assert 0.3 < flipped.float().mean() < 0.7
    assert torch.equal(r[:, 0], r[:, 1])
    assert not torch.allclose(x, r[:, 0])  # photometric steps touch the image only
    z = standardize(torch.rand(5, 3, 6, 6) * 7 + 2)
    assert torch.allclose(z.mean((1, 2, 3)), torch.zeros(5), atol=1e-5)
    assert torch.allclose(z.std((1, 2, 3), correction=0), torch.ones(5), atol=1e-4)
    flat = standardize(torch.full((1, 1, 4, 4), 0.3))  # constant image: std floor, no NaN
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-5
