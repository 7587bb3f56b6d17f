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
