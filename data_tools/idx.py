"""Read the IDX files that MNIST (and Fashion-MNIST) ship in, plain or gzipped, into numpy.

IDX layout (http://yann.lecun.com/exdb/mnist/): a big-endian 4-byte magic number
`0x00 0x00 <dtype> <ndim>`, then `ndim` big-endian uint32 dimensions, then the data, row-major.
MNIST uses dtype 0x08 (unsigned byte): images are 0x00000803 (N, rows, cols), labels
0x00000801 (N,).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from data_tools.errors import DataToolError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# split → (images stem, labels stem); each may also be spelled with a dot before `idx`
# (e.g. `train-images.idx3-ubyte`, as some mirrors do) and may end in `.gz`.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it ends in `.gz`."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exn:
        # gzip raises BadGzipFile (an OSError) for non-gzip data and EOFError when cut short.
        raise DataToolError(f"{path}: cannot read ({exn})") from exn


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes whose magic number must be `magic`.

    Returns a uint8 array with the file's dimensions, e.g. (N, 28, 28) for images.
    Raises DataToolError naming the file if it is not such an IDX file or is truncated.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataToolError(f"{path}: not an IDX file ({len(data)} bytes, no magic number)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataToolError(
            f"{path}: not an IDX file of the expected kind "
            f"(magic number 0x{found:08x}, expected 0x{magic:08x})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataToolError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in dims):
        raise DataToolError(f"{path}: IDX dimensions {dims} contain a zero")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "too long"
        raise DataToolError(
            f"{path}: {what} IDX file ({len(data)} bytes, dimensions {dims} need {expected})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_file(src: Path, stem: str) -> Path:
    """The file for `stem` in `src`: plain or `.gz`, with `-idx` or `.idx` in its name."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (src / name).is_file():
            return src / name
    raise DataToolError(f"{src}: no {stem} or {stem}.gz in this folder")


def load_mnist_idx(src: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load MNIST's four IDX files from `src` → {"train": (images, labels), "test": ...}.

    Images are uint8 (N, H, W, 1) (HWC, as the shards store them), labels uint8 (N,).
    """
    src = Path(src)
    if not src.is_dir():
        raise DataToolError(f"{src}: not a folder (--src must hold the MNIST IDX files)")
    splits = {}
    for split, (images_stem, labels_stem) in MNIST_FILES.items():
        images_path = find_idx_file(src, images_stem)
        labels_path = find_idx_file(src, labels_stem)
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC)
        if len(labels) != len(images):
            raise DataToolError(
                f"{labels_path}: {len(labels)} labels but {images_path.name} "
                f"holds {len(images)} images"
            )
        splits[split] = (images[..., None], labels)
    return splits
