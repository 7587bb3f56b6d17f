"""Readers of the raw files data sets ship in: one `read_*_split(root, files)` per format.

Each takes the folder (or file) the files are in and the names the converter table declares
for one split (`data_tools.converters.CONVERTERS`), and returns (uint8 images (N, H, W, C), int
labels (N,)), HWC as the shards store them. They check the file format and that images and
labels agree; shapes and label ranges are checked once, by the converter, for every format.
Every failure is a DataToolError naming the file.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

from data_tools.shards import DataToolError

Split = tuple[np.ndarray, np.ndarray]


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


# --- IDX: MNIST and Fashion-MNIST -----------------------------------------------------------
# Layout (http://yann.lecun.com/exdb/mnist/): a big-endian 4-byte magic number
# `0x00 0x00 <dtype> <ndim>`, then `ndim` big-endian uint32 dimensions, then the data, row-major.
# MNIST uses dtype 0x08 (unsigned byte): images are 0x00000803 (N, rows, cols), labels
# 0x00000801 (N,).
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


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


def _find_idx_file(src: Path, stem: str) -> Path:
    """The file for `stem` in `src`: plain or `.gz`, with `-idx` or `.idx` in its name (some
    mirrors spell it `train-images.idx3-ubyte`)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (src / name).is_file():
            return src / name
    raise DataToolError(f"{src}: no {stem} or {stem}.gz in this folder")


def read_idx_split(src: Path, files: tuple[str, str]) -> Split:
    """The (images, labels) IDX pair named `files` in folder `src` → uint8 (N, H, W, 1), (N,)."""
    if not src.is_dir():
        raise DataToolError(f"{src}: not a folder (--src must hold the MNIST IDX files)")
    images_path, labels_path = (_find_idx_file(src, stem) for stem in files)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(labels) != len(images):
        raise DataToolError(
            f"{labels_path}: {len(labels)} labels but {images_path.name} holds {len(images)} images"
        )
    return images[..., None], labels


# --- CIFAR-10: binary or python version ------------------------------------------------------
# Binary (`cifar-10-batches-bin/`): `data_batch_1..5.bin` and `test_batch.bin`, each 10,000
# records of 1 label byte + 3,072 pixel bytes (1,024 red, then green, then blue, each row-major
# 32x32). Python (`cifar-10-batches-py/`): pickled dicts with `data` (10000, 3072) uint8 in the
# same order and `labels`. Pickles can run code when loaded: they are read with an unpickler
# that only builds numpy arrays, lists and dicts.
CIFAR_RECORD = 1 + 32 * 32 * 3


def _chw_to_hwc(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) in CIFAR's channel-major order → uint8 (N, 32, 32, 3)."""
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _read_cifar_binary(path: Path) -> Split:
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % CIFAR_RECORD:
        raise DataToolError(
            f"{path}: {data.size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 "
            f"records"
        )
    records = data.reshape(-1, CIFAR_RECORD)
    return _chw_to_hwc(records[:, 1:]), records[:, 0].copy()


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (no code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_python(path: Path) -> Split:
    try:
        batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exn:
        raise DataToolError(f"{path}: not a CIFAR-10 python batch ({exn})") from exn
    if data.ndim != 2 or data.shape[1] != CIFAR_RECORD - 1 or len(labels) != len(data):
        raise DataToolError(f"{path}: data {data.shape} / labels {labels.shape} are not CIFAR-10's")
    return _chw_to_hwc(data), labels


def read_cifar_split(root: Path, batches: tuple[str, ...]) -> Split:
    """The named batches (`data_batch_1`, ...), binary or python version, found in `root` or in
    its `cifar-10-batches-bin/` or `cifar-10-batches-py/` → uint8 (N, 32, 32, 3), labels (N,)."""
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        binary = (folder / "data_batch_1.bin").is_file()
        if binary or (folder / "data_batch_1").is_file():
            break
    else:
        raise DataToolError(
            f"{root}: no CIFAR-10 batches (data_batch_1.bin or data_batch_1, possibly in "
            f"cifar-10-batches-bin/ or cifar-10-batches-py/)"
        )
    parts = []
    for name in batches:
        path = folder / (name + ".bin" if binary else name)
        if not path.is_file():
            raise DataToolError(f"{path}: missing CIFAR-10 batch")
        parts.append(_read_cifar_binary(path) if binary else _read_cifar_python(path))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- smallNORB: LeCun's binary matrices ------------------------------------------------------
# The `.mat` files are not MATLAB files: a little-endian int32 magic (0x1E3D4C55 bytes,
# 0x1E3D4C54 int32), int32 ndim, max(3, ndim) int32 dimensions, then the data. `-dat` holds
# (N, 2, 96, 96) uint8 stereo pairs, `-cat` (N,) int32 categories 0-4. The paper downsamples the
# pairs to 48x48 (we average 2x2 blocks) and keeps both views as 2 channels.
NORB_MAGIC = {0x1E3D4C55: np.uint8, 0x1E3D4C54: np.dtype("<i4")}


def read_norb_matrix(path: Path) -> np.ndarray:
    """One binary matrix file (plain or .gz) → numpy array with its dimensions."""
    data = _read_bytes(path)
    if len(data) < 8:
        raise DataToolError(f"{path}: too short for a NORB matrix header")
    magic, ndim = np.frombuffer(data[:8], dtype="<i4")
    if int(magic) not in NORB_MAGIC or not 1 <= ndim <= 8:
        raise DataToolError(
            f"{path}: not a NORB byte/int matrix (magic 0x{int(magic) & 0xFFFFFFFF:08x})"
        )
    header = 8 + 4 * max(3, int(ndim))
    dims = tuple(int(d) for d in np.frombuffer(data[8:header], dtype="<i4"))[: int(ndim)]
    dtype = np.dtype(NORB_MAGIC[int(magic)])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataToolError(f"{path}: {len(data)} bytes, dimensions {dims} need {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def downsample(pairs: np.ndarray) -> np.ndarray:
    """(N, 2, H, W) uint8 → (N, H/2, W/2, 2) uint8, the mean of each 2x2 block, rounded."""
    n, c, h, w = pairs.shape
    blocks = pairs.reshape(n, c, h // 2, 2, w // 2, 2).astype(np.uint16).sum((3, 5))
    return ((blocks + 2) // 4).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def read_norb_split(src: Path, files: tuple[str, str]) -> Split:
    """The `-dat` and `-cat` files named `files` (plain or .gz) in `src` → uint8 (N, H/2, W/2, 2)
    (both views as channels), int64 labels (N,)."""
    dat_path, cat_path = (_find_plain_or_gz(src, name) for name in files)
    pairs, labels = read_norb_matrix(dat_path), read_norb_matrix(cat_path).reshape(-1)
    if pairs.ndim != 4 or pairs.shape[1] != 2 or pairs.shape[2] % 2 or pairs.shape[3] % 2:
        raise DataToolError(f"{dat_path}: expected (N, 2, H, W) stereo pairs, got {pairs.shape}")
    if len(labels) != len(pairs):
        raise DataToolError(f"{cat_path}: {len(labels)} labels for {len(pairs)} pairs")
    # Chunks keep the uint16 intermediate small (24,300 x 2 x 96 x 96).
    images = np.concatenate([downsample(pairs[i : i + 2000]) for i in range(0, len(pairs), 2000)])
    return images, labels.astype(np.int64)


def _find_plain_or_gz(src: Path, name: str) -> Path:
    for candidate in (src / name, src / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataToolError(f"{src}: no {name} or {name}.gz")


# --- affNIST: MATLAB files --------------------------------------------------------------------
# `test.mat` (or a folder of numbered `*.mat` batches) holds a struct `affNISTdata` with `image`
# (1600, N) uint8, one 40x40 image per column in row-major order, and `label_int` (N,).
AFFNIST_SIZE = 40


def read_affnist_mat(path: Path) -> Split:
    """One affNIST .mat file → (uint8 (N, 40, 40, 1), int64 labels (N,))."""
    from scipy.io import loadmat  # heavy import, only needed here

    try:
        struct = loadmat(path, squeeze_me=True, struct_as_record=False)["affNISTdata"]
        columns = np.asarray(struct.image, dtype=np.uint8)
        labels = np.asarray(struct.label_int, dtype=np.int64).reshape(-1)
    except (OSError, ValueError, KeyError, AttributeError, TypeError, NotImplementedError) as exn:
        raise DataToolError(f"{path}: not an affNIST .mat file ({exn})") from exn
    columns = columns.reshape(AFFNIST_SIZE * AFFNIST_SIZE, -1)
    if len(labels) != columns.shape[1]:
        raise DataToolError(f"{path}: {columns.shape[1]} images but {len(labels)} labels")
    return np.ascontiguousarray(columns.T.reshape(-1, AFFNIST_SIZE, AFFNIST_SIZE, 1)), labels


def read_affnist_split(root: Path, files: tuple[str, ...]) -> Split:
    """`root` if it is a .mat file, else the first of `files` in it, else every `*.mat` below
    it (numbered batches, in numeric order), concatenated."""
    paths = [root] if root.is_file() else [root / f for f in files if (root / f).is_file()][:1]
    if not paths:
        paths = sorted(root.glob("**/*.mat"), key=lambda p: (len(p.stem), p.stem))
    if not paths:
        raise DataToolError(f"{root}: no affNIST .mat file (test.mat or numbered batches)")
    parts = [read_affnist_mat(p) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
