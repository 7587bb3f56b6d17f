"""`capsdist data smallnorb`: the smallNORB files → 48x48x2 shards (24,300 train / 24,300 test).

smallNORB's `.mat` files are not MATLAB files but LeCun's binary matrix format: a little-endian
int32 magic (0x1E3D4C55 bytes, 0x1E3D4C54 int32), int32 ndim, max(3, ndim) int32 dimensions,
then the data. `-dat` holds (N, 2, 96, 96) uint8 stereo pairs, `-cat` (N,) int32 categories 0-4.
The paper downsamples the 96x96 pairs to 48x48 (we average 2x2 blocks) and keeps both views
as 2 channels; the 32x32 crops are the reader's job (configs/smallnorb.yaml).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.errors import DataToolError
from data_tools.output import write_array_dataset
from data_tools.sources import resolve_src

NUM_CLASSES = 5
MAGIC = {0x1E3D4C55: np.uint8, 0x1E3D4C54: np.dtype("<i4")}
FILES = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training-{}.mat",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing-{}.mat",
}


def read_norb_matrix(path: Path) -> np.ndarray:
    """One binary matrix file (plain or .gz) → numpy array with its dimensions."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exn:
        raise DataToolError(f"{path}: cannot read ({exn})") from exn
    if len(data) < 8:
        raise DataToolError(f"{path}: too short for a NORB matrix header")
    magic, ndim = np.frombuffer(data[:8], dtype="<i4")
    if int(magic) not in MAGIC or not 1 <= ndim <= 8:
        raise DataToolError(
            f"{path}: not a NORB byte/int matrix (magic 0x{int(magic) & 0xFFFFFFFF:08x})"
        )
    header = 8 + 4 * max(3, int(ndim))
    dims = tuple(int(d) for d in np.frombuffer(data[8:header], dtype="<i4"))[: int(ndim)]
    dtype = np.dtype(MAGIC[int(magic)])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataToolError(f"{path}: {len(data)} bytes, dimensions {dims} need {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find(src: Path, name: str) -> Path:
    for candidate in (src / name, src / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataToolError(f"{src}: no {name} or {name}.gz")


def downsample(pairs: np.ndarray) -> np.ndarray:
    """(N, 2, H, W) uint8 → (N, H/2, W/2, 2) uint8, the mean of each 2x2 block, rounded."""
    n, c, h, w = pairs.shape
    blocks = pairs.reshape(n, c, h // 2, 2, w // 2, 2).astype(np.uint16).sum((3, 5))
    return ((blocks + 2) // 4).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def load_smallnorb(src: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits = {}
    for split, pattern in FILES.items():
        dat_path, cat_path = _find(src, pattern.format("dat")), _find(src, pattern.format("cat"))
        pairs, labels = read_norb_matrix(dat_path), read_norb_matrix(cat_path).reshape(-1)
        if pairs.ndim != 4 or pairs.shape[1] != 2 or pairs.shape[2] % 2 or pairs.shape[3] % 2:
            raise DataToolError(
                f"{dat_path}: expected (N, 2, H, W) stereo pairs, got {pairs.shape}"
            )
        if len(labels) != len(pairs) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise DataToolError(
                f"{cat_path}: {len(labels)} labels in 0-4 expected for {len(pairs)} pairs"
            )
        # Chunks keep the uint16 intermediate small (24,300 x 2 x 96 x 96).
        images = np.concatenate(
            [downsample(pairs[i : i + 2000]) for i in range(0, len(pairs), 2000)]
        )
        splits[split] = (images, labels.astype(np.int64))
    return splits


def make_smallnorb(
    src: str | Path | None,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """smallNORB's -dat/-cat files in `src` (plain or .gz; None: download) → `smallnorb`
    shards, 48x48x2, in `out`."""
    src = resolve_src("smallnorb", src, out, mirror=mirror, progress=progress)
    return write_array_dataset(
        out,
        dataset="smallnorb",
        splits=load_smallnorb(src),
        num_classes=NUM_CLASSES,
        samples_per_shard=samples_per_shard,
        extra_meta={"source": f"smallNORB files in {src.resolve()}", "downsampled": "2x2 mean"},
        progress=progress,
    )
