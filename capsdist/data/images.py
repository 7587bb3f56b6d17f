"""Encoded images in shards that capsdist did not write: PNG/JPEG fields → uint8 HWC pixels.

capsdist's own shards hold raw pixels (`img.u8`) so that decoding is never a GPU's bottleneck.
webdataset sets written by others (`wds.ShardWriter` over an image folder) hold `.png` or `.jpg`
members; `capsdist data index` records which field and what shape in meta.json, and the
reader's workers decode each image here, with Pillow (what webdataset's own decoders use),
keeping the channels the file has: a grayscale PNG is (H, W, 1), not webdataset's RGB default.
"""

from __future__ import annotations

import io

import numpy as np

RAW_FIELD = "img.u8"
# The encoded image fields a shard may hold, in the order `capsdist data index` looks for them.
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm")
# Pillow modes kept as they are → channels; "1" (1-bit) and "P" (palette) are converted first.
_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_CONVERT = {"1": "L", "P": "RGBA", "PA": "RGBA"}


class ImageError(ValueError):
    """The bytes are not an image Pillow can decode to 8-bit pixels."""


def decode_image(data: bytes) -> np.ndarray:
    """uint8 (H, W, C) pixels of a PNG/JPEG/... file held in memory; ImageError if unreadable."""
    from PIL import Image, UnidentifiedImageError  # only shards of encoded images need Pillow

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode in _CONVERT:
                has_alpha = image.mode == "PA" or "transparency" in image.info
                target = _CONVERT[image.mode] if has_alpha or image.mode == "1" else "RGB"
                image = image.convert(target)
            channels = _CHANNELS.get(image.mode)
            if channels is None:
                raise ImageError(f"{image.mode} images are not supported (8-bit L/RGB/RGBA are)")
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exn:
        raise ImageError(f"not a readable image ({exn})") from exn
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


def image_field(sample: dict) -> str | None:
    """The field of `sample` that holds its image: `img.u8`, else the first encoded one."""
    if RAW_FIELD in sample:
        return RAW_FIELD
    return next((field for field in IMAGE_FIELDS if field in sample), None)
