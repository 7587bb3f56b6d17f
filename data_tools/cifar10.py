"""`capsdist data cifar10`: CIFAR-10 (binary or python version, archive or folder) → shards.

Binary version (`cifar-10-binary.tar.gz` → `cifar-10-batches-bin/`): `data_batch_1..5.bin` and
`test_batch.bin`, each 10,000 records of 1 label byte + 3,072 pixel bytes (1,024 red, then green,
then blue, each row-major 32x32). Python version (`cifar-10-python.tar.gz` →
`cifar-10-batches-py/`): pickled dicts with `data` (10000, 3072) uint8 in the same order and
`labels`. Pickles can run code when loaded: they are read with an unpickler that only builds
numpy arrays, lists and dicts. Shards hold the full 32x32x3 images; the 24x24 crops are the
reader's job (configs/cifar10.yaml).
"""

from __future__ import annotations

import io
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.download import safe_extract
from data_tools.errors import DataToolError
from data_tools.output import write_array_dataset
from data_tools.sources import resolve_src

NUM_CLASSES = 10
RECORD = 1 + 32 * 32 * 3
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]


def _chw_to_hwc(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) in CIFAR's channel-major order → uint8 (N, 32, 32, 3)."""
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % RECORD:
        raise DataToolError(
            f"{path}: {data.size} bytes is not a whole number of {RECORD}-byte CIFAR-10 records"
        )
    records = data.reshape(-1, RECORD)
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


def read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exn:
        raise DataToolError(f"{path}: not a CIFAR-10 python batch ({exn})") from exn
    if data.ndim != 2 or data.shape[1] != RECORD - 1 or len(labels) != len(data):
        raise DataToolError(f"{path}: data {data.shape} / labels {labels.shape} are not CIFAR-10's")
    return _chw_to_hwc(data), labels


def _find_batches(root: Path) -> tuple[Path, bool]:
    """The folder holding the batches and whether it is the binary version."""
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        if (folder / "data_batch_1.bin").is_file():
            return folder, True
        if (folder / "data_batch_1").is_file():
            return folder, False
    raise DataToolError(
        f"{root}: no CIFAR-10 batches (data_batch_1.bin or data_batch_1, possibly in "
        f"cifar-10-batches-bin/ or cifar-10-batches-py/)"
    )


def load_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder, binary = _find_batches(root)
    splits = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
        parts = []
        for name in names:
            path = folder / (name + ".bin" if binary else name)
            if not path.is_file():
                raise DataToolError(f"{path}: missing CIFAR-10 batch")
            parts.append(read_binary_batch(path) if binary else read_python_batch(path))
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.max() >= NUM_CLASSES:
            raise DataToolError(
                f"{folder}: {split} labels go up to {labels.max()}, CIFAR-10 has 0-9"
            )
        splits[split] = (images, labels)
    return splits


def make_cifar10(
    src: str | Path | None,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """CIFAR-10 from `src` (.tar.gz of either version, or its extracted folder; None:
    download the binary version) → `cifar10` shards (50,000 / 10,000, 32x32x3) in `out`."""
    src = resolve_src("cifar10", src, out, mirror=mirror, progress=progress)
    if src.is_dir() and not any(src.glob("**/data_batch_1*")):
        archives = sorted(src.glob("cifar-10-*.tar.gz"))
        src = archives[0] if archives else src
    scratch = None
    try:
        if src.is_file():
            Path(out).mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=out))
            root = safe_extract(src, scratch)
        else:
            root = src
        splits = load_cifar10(root)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return write_array_dataset(
        out,
        dataset="cifar10",
        splits=splits,
        num_classes=NUM_CLASSES,
        samples_per_shard=samples_per_shard,
        extra_meta={"source": f"CIFAR-10 from {src.resolve()}"},
        progress=progress,
    )
