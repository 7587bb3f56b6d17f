"""What `capsdist predict` makes of its inputs (capsdist/serve/inputs.py): files, arrays and
folders read, then converted as the model's data set was (channels, polarity, size)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from capsdist.serve.inputs import Conversion, Item, count_items, list_sources, read_items

MNIST = Conversion.of([28, 28, 1], [28, 28, 1], invert=False)


def grey(value: int, size: int = 28) -> np.ndarray:
    return np.full((size, size, 1), value, dtype=np.uint8)


def test_rgb_becomes_grey_by_luma_and_grey_becomes_rgb():
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # pure red: luma 0.299 * 200
    pixels, resized = MNIST(Item("x", rgb))
    assert pixels.shape == (28, 28, 1) and resized is None
    assert int(pixels[0, 0, 0]) == round(0.299 * 200)
    colour = Conversion.of([24, 24, 3], [24, 24, 3], invert=False)
    pixels, _ = colour(Item("x", grey(7, 24)))
    assert pixels.shape == (24, 24, 3) and (pixels == 7).all()


def test_transparent_background_takes_the_data_sets_background():
    """A white digit on a transparent background: black around it; with --invert (a dark
    digit drawn on transparency, for a white-on-black model) the background is white first,
    then inverted to black as well."""
    la = np.zeros((28, 28, 2), dtype=np.uint8)
    la[10:18, 10:18] = (255, 255)  # opaque white stroke; the rest fully transparent
    pixels, _ = MNIST(Item("x", la, has_alpha=True))
    assert pixels[0, 0, 0] == 0 and pixels[12, 12, 0] == 255
    la[10:18, 10:18] = (0, 255)  # opaque black stroke
    inverted, _ = Conversion.of([28, 28, 1], [28, 28, 1], invert=True)(Item("x", la, True))
    assert inverted[0, 0, 0] == 0 and inverted[12, 12, 0] == 255


def test_shard_sized_images_are_centre_cropped_others_resized():
    """CIFAR-10: 32x32 shards, a 24x24 model. A 32x32 image is cut as evaluation cuts it; any
    other size is resized to 32x32 first, then cut."""
    cifar = Conversion.of([24, 24, 3], [32, 32, 3], invert=False)
    image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3) % 251
    pixels, resized = cifar(Item("x", image.astype(np.uint8)))
    assert resized is None and (pixels == image[4:28, 4:28]).all()
    pixels, resized = cifar(Item("x", np.zeros((64, 48, 3), dtype=np.uint8)))
    assert resized == (64, 48) and pixels.shape == (24, 24, 3)
    pixels, resized = cifar(Item("x", np.zeros((24, 24, 3), dtype=np.uint8)))
    assert resized is None and pixels.shape == (24, 24, 3)  # already the model's size


def test_shards_that_cannot_have_fed_the_model_are_ignored():
    assert Conversion.of([28, 28, 1], [32, 32, 3], invert=False).data_shape == (28, 28, 1)
    assert Conversion.of([28, 28, 1], [20, 20, 1], invert=False).data_shape == (28, 28, 1)


def test_stereo_models_need_two_channel_arrays():
    norb = Conversion.of([32, 32, 2], [48, 48, 2], invert=False)
    with pytest.raises(ValueError, match=r"a stereo pair: pass a \.npy of shape \(H, W, 2\)"):
        norb(Item("x", np.zeros((48, 48, 3), dtype=np.uint8)))
    pixels, _ = norb(Item("x", np.zeros((48, 48, 2), dtype=np.uint8)))
    assert pixels.shape == (32, 32, 2)


def test_npy_layouts_ranges_and_stacks(tmp_path):
    np.save(tmp_path / "hw.npy", np.full((28, 28), 0.5, dtype=np.float32))
    np.save(tmp_path / "chw.npy", np.zeros((3, 28, 28), dtype=np.uint8))
    np.save(tmp_path / "stack.npy", np.zeros((4, 28, 28, 1), dtype=np.uint8))
    np.save(tmp_path / "too_bright.npy", np.full((28, 28), 255.0))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    sources, _ = list_sources([str(tmp_path)], "test")
    assert count_items(sources) == 1 + 1 + 1 + 4 + 1
    items = {item.path.rsplit("/", 1)[1]: item for item in read_items(sources)}
    assert items["hw.npy"].pixels.shape == (28, 28, 1) and items["hw.npy"].pixels[0, 0, 0] == 128
    assert items["chw.npy"].pixels.shape == (28, 28, 3)
    assert [f"stack.npy[{i}]" in items for i in range(4)] == [True] * 4
    assert "float values must be in [0, 1]" in items["too_bright.npy"].error
    assert "not a readable .npy array" in items["objects.npy"].error  # never unpickled


def test_folders_list_images_only_and_named_files_are_always_tried(tmp_path):
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "sub" / "a.jpg")
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    sources, warnings = list_sources([str(tmp_path), str(tmp_path / "readme.md")], "test")
    names = [s.rsplit("/", 1)[1] for s in sources]
    assert names == ["b.png", "a.jpg", "readme.md"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path}: left out 1 file(s)")
    items = list(read_items(sources))
    assert items[0].pixels.shape == (5, 5, 1) and items[1].pixels.shape == (5, 5, 3)
    assert items[2].error.startswith("not an image file")
    missing = list(read_items([str(tmp_path / "gone.png")]))
    assert missing[0].error.startswith("cannot read it")
