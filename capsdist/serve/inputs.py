"""What `capsdist predict` reads: image files, .npy arrays, folders of them, shard sets, turned
into the uint8 pixels (H, W, C) the model's data set had.

The data set decides the conversion (Conversion): channels (RGB → grey by ITU-R 601 luma, as
Pillow's "L"; grey → RGB by repeating; a transparent background laid on the data set's
background), polarity (MNIST-style digits are white on black; `--invert` for black-on-white
scans), and size: an image of the shards' size is centre-cropped to the model's input as
evaluation does (CIFAR-10 32x32 → 24x24); any other size is resized (bilinear) to the shards'
size first, with a warning. Pixels then become floats / 255, as the reader makes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capsdist.data import DataError, is_remote, read_meta
from capsdist.data.images import ImageError, decode_image
from capsdist.data.meta import META_NAME, shard_root, split_shards
from capsdist.data.source import prefetched, shard_tasks
from capsdist.data.stream import SampleFormat, decode, read_shard

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
ARRAY_SUFFIX = ".npy"
UNKNOWN_FORMAT = "not an image file (PNG, JPEG, BMP, GIF, WebP, PPM/PGM, TIFF) nor a .npy array"


@dataclass
class Item:
    """One input: where it came from, its pixels or why there are none, its label if known."""

    path: str
    pixels: np.ndarray | None = None
    """uint8 (H, W, C) as read, before conversion."""
    has_alpha: bool = False
    """The last channel is transparency (an image file's LA / RGBA), not data."""
    label: list[int] | None = None
    """The true class(es), for samples of a shard set."""
    from_shards: bool = False
    """A sample of a shard set: cut to the model's size as evaluation cuts it, never resized."""
    resized_from: tuple[int, int] | None = None
    """(H, W) it had before it was resized to the data set's size, if it was."""
    error: str = ""


# ---- what to read -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSet:
    """The `split` of a data set written by `capsdist data ...` (a folder or URL)."""

    root: str
    split: str
    meta: dict


def list_sources(paths: list[str], split: str) -> tuple[list[str | ShardSet], list[str]]:
    """(files and shard sets in order, warnings). A folder is searched recursively for image
    and .npy files (sorted; others are left out, counted in a warning); a folder or URL with a
    meta.json is a shard set, read at `split`. A named file is always tried."""
    sources: list[str | ShardSet] = []
    warnings: list[str] = []
    for path in paths:
        if is_remote(path) or (Path(path).is_dir() and (Path(path) / META_NAME).is_file()):
            meta = read_meta(path)
            split_shards(meta, split, path)  # DataError naming the split if it is not there
            sources.append(ShardSet(path, split, meta))
        elif Path(path).is_dir():
            found, others = _files_under(Path(path))
            sources += found
            if others:
                warnings.append(
                    f"{path}: left out {others} file(s) that are not images "
                    f"({', '.join(IMAGE_SUFFIXES + (ARRAY_SUFFIX,))})"
                )
        else:
            sources.append(path)
    return sources, warnings


def _files_under(folder: Path) -> tuple[list[str], int]:
    found, others = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith((*IMAGE_SUFFIXES, ARRAY_SUFFIX)):
                found.append(str(Path(dirpath) / name))
            else:
                others += 1
    return found, others


def count_items(sources: list[str | ShardSet]) -> int:
    """Inputs to expect, for the progress bar: a shard set's samples, a .npy stack's images."""
    return sum(_count(source) for source in sources)


def _count(source: str | ShardSet) -> int:
    if isinstance(source, ShardSet):
        return source.meta["splits"][source.split]
    if source.lower().endswith(ARRAY_SUFFIX):
        try:  # the header only: the array is memory-mapped, not read
            shape = np.load(source, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError):
            return 1  # unreadable: its error line counts as one
        return shape[0] if len(shape) == 4 else 1
    return 1


def read_items(sources: list[str | ShardSet], on_error: str = "raise") -> Iterator[Item]:
    """Every input in order: a file's pixels (or error), each image of a .npy stack, each
    sample of a shard set (path `SHARD#KEY`, with its label)."""
    for source in sources:
        if isinstance(source, ShardSet):
            yield from shard_items(source.root, source.meta, source.split, on_error=on_error)
        elif source.lower().endswith(ARRAY_SUFFIX):
            yield from _array_items(source)
        else:
            yield _image_item(source)


def _image_item(path: str) -> Item:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return Item(path, error=f"cannot read it ({err.strerror or err})")
    try:
        pixels = decode_image(data)
    except ImageError as err:
        unknown = "cannot identify image file" in str(err)  # Pillow knows no such format
        return Item(path, error=UNKNOWN_FORMAT if unknown else str(err))
    return Item(path, pixels, has_alpha=pixels.shape[2] in (2, 4))


def _array_items(path: str) -> Iterator[Item]:
    """A .npy of one image, (H, W), (H, W, C) or (C, H, W), or a stack (N, H, W, C) / (N, C, H,
    W); uint8 pixels, or floats in [0, 1] (rounded to the 8-bit pixels the data sets hold)."""
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle a file given to us
    except (OSError, ValueError) as err:
        yield Item(path, error=f"not a readable .npy array ({err})")
        return
    try:
        pixels = _as_uint8(array)
        if array.ndim == 4:
            for i, image in enumerate(pixels):
                yield Item(f"{path}[{i}]", _as_hwc(image, array.shape))
        else:
            yield Item(path, _as_hwc(pixels, array.shape))
    except ImageError as err:
        yield Item(path, error=str(err))


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.size == 0 or array.dtype.kind not in "fiu":
        raise ImageError(f"holds {array.dtype} values, not pixels")
    low, high = float(array.min()), float(array.max())
    if array.dtype.kind == "f":
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
            raise ImageError(f"float values must be in [0, 1], found [{low:g}, {high:g}]")
        return np.rint(array * 255).astype(np.uint8)
    if low < 0 or high > 255:
        raise ImageError(f"integer pixels must be in 0..255, found {low:g}..{high:g}")
    return array.astype(np.uint8)


def _as_hwc(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim == 3 and image.shape[2] <= 4:
        return image
    if image.ndim == 3 and image.shape[0] <= 4:
        return np.ascontiguousarray(image.transpose(1, 2, 0))
    raise ImageError(
        f"shape {list(shape)} is not an image: expected (H, W), (H, W, C), (C, H, W) with C <= 4, "
        "or a stack (N, H, W, C) / (N, C, H, W); save N grey images as (N, H, W, 1)"
    )


def shard_items(
    root: str, meta: dict, split: str, max_examples: int = 0, on_error: str = "raise"
) -> Iterator[Item]:
    """The samples of `split` in shard order (each checked as the reader checks it), as Items
    named `SHARD#KEY` with their labels."""
    fmt = SampleFormat.from_meta(meta, on_error, recon=False)
    names = split_shards(meta, split, root)
    shape = tuple(meta["image_shape"])
    for shard in prefetched(shard_tasks(shard_root(meta, root), meta, names, max_examples)):
        url = shard.task.url
        for key, image, labels, _ in decode(read_shard(shard), fmt):
            pixels = np.frombuffer(image, dtype=np.uint8).reshape(shape)
            yield Item(f"{url}#{key}", pixels, label=list(labels), from_shards=True)


def first_images(root: str, meta: dict, split: str, n: int) -> np.ndarray:
    """uint8 (n', H, W, C): the first n samples of `split` (fewer if it is smaller)."""
    items = list(shard_items(root, meta, split, max_examples=n))
    if not items:
        raise DataError(f"{root}: split {split!r} holds no sample")
    return np.stack([item.pixels for item in items])


# ---- how the data set looked --------------------------------------------------------------------


@dataclass(frozen=True)
class Conversion:
    """What an input must become: the model's input (h, w, C), cut from images of the shards'
    size (H, W) as evaluation cuts them (centred)."""

    model_shape: tuple[int, int, int]
    data_shape: tuple[int, int, int]
    invert: bool = False
    """Black-on-white inputs for a white-on-black data set: pixels become 255 - pixels."""

    @classmethod
    def of(cls, model_shape: list[int], data_shape: list[int], invert: bool) -> Conversion:
        """Shards that the model cannot have been evaluated on (other channels, smaller) are
        ignored: the model's own shape stands for them."""
        h, w, c = model_shape
        dh, dw, dc = data_shape
        fits = dc == c and dh >= h and dw >= w
        return cls(tuple(model_shape), tuple(data_shape) if fits else tuple(model_shape), invert)

    def __call__(self, item: Item) -> tuple[np.ndarray, tuple[int, int] | None]:
        """(uint8 (h, w, C) pixels for the model, the size it was resized from or None)."""
        pixels = self._channels(item.pixels, item.has_alpha)
        if self.invert:
            pixels = 255 - pixels
        height, width = pixels.shape[:2]
        resized_from = None
        fits = height >= self.model_shape[0] and width >= self.model_shape[1]
        native = (height, width) == self.data_shape[:2] or (item.from_shards and fits)
        if not native and (height, width) != self.model_shape[:2]:
            resized_from = (height, width)
            pixels = resize(pixels, self.data_shape[:2])
        return centre_crop(pixels, self.model_shape[:2]), resized_from

    def _channels(self, pixels: np.ndarray, has_alpha: bool) -> np.ndarray:
        want = self.model_shape[2]
        if has_alpha:
            # Transparent areas take the background of the picture: black for white-on-black
            # data, white when the input is black on white (--invert).
            colour, alpha = pixels[..., :-1].astype(np.float32), pixels[..., -1:] / 255.0
            background = 255.0 if self.invert else 0.0
            pixels = np.rint(colour * alpha + background * (1 - alpha)).astype(np.uint8)
        have = pixels.shape[2]
        if have == want:
            return pixels
        if have == 3 and want == 1:  # ITU-R 601-2 luma, as Pillow's convert("L")
            grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            return np.rint(grey).clip(0, 255).astype(np.uint8)[:, :, None]
        if have == 1 and want == 3:
            return np.repeat(pixels, 3, axis=2)
        raise ImageError(
            f"has {have} channel(s); the model takes {want}"
            + (" (a stereo pair: pass a .npy of shape (H, W, 2))" if want == 2 else "")
        )


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, C) → (h, w, C), bilinear (with Pillow's antialiasing when shrinking)."""
    from PIL import Image

    h, w = size
    channels = [
        np.asarray(Image.fromarray(pixels[:, :, c]).resize((w, h), Image.Resampling.BILINEAR))
        for c in range(pixels.shape[2])
    ]
    return np.stack(channels, axis=2)


def centre_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centred (h, w) window, offsets as the reader's evaluation crop (augment.py)."""
    h, w = size
    top, left = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
    return np.ascontiguousarray(pixels[top : top + h, left : left + w])
