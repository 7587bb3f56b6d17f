"""Write webdataset tar shards: `{split}-{shard:06d}.tar`, one sample = a few files sharing a key.

Each sample holds `{key}.img.u8` (raw uint8 pixels, HWC, no header: the reader knows the shape
from meta.json) and `{key}.cls` (ASCII label, `b"7"`, or `b"3,8"` for two targets), plus any extra
fields a converter adds. Tar headers carry fixed times and owners so that the same content always
gives byte-identical shards (and so the same sha256 in meta.json).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def shard_name(split: str, index: int) -> str:
    """The file name of shard `index` of `split`, e.g. `train-000003.tar`."""
    return f"{split}-{index:06d}.tar"


def encode_label(label: int | Sequence[int]) -> bytes:
    """`7` → `b"7"`; `(3, 8)` → `b"3,8"` (two-target data such as MultiMNIST)."""
    if isinstance(label, (int, np.integer)):
        return str(int(label)).encode("ascii")
    return ",".join(str(int(x)) for x in label).encode("ascii")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """What meta.json records about one written shard."""

    name: str
    num_samples: int
    sha256: str


class ShardWriter:
    """Write the samples of one split into shards of `samples_per_shard` samples each.

    Each shard is written under a temporary name and renamed when complete, so a reader (or a
    re-run after a crash) never sees half a shard under its real name. Use as a context manager;
    `shards` lists what was written, in order.
    """

    def __init__(self, out: str | Path, split: str, samples_per_shard: int = 1000):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out = Path(out)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample: `fields` maps extension (`img.u8`, `cls`, ...) to its bytes."""
        if "." in key or "/" in key:
            # webdataset splits the key from the extension at the first dot of the file name.
            raise ValueError(f"sample key must not contain '.' or '/': {key!r}")
        if self._tar is None:
            self._open()
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # fixed header fields: same content → same bytes → same sha256
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish_shard()

    def close(self) -> list[ShardInfo]:
        """Finish the last (possibly smaller) shard; returns all shards written."""
        if self._tar is not None:
            self._finish_shard()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            # Leave no temporary file behind; finished shards stay (a re-run overwrites them).
            self._tar.close()
            self._tmp_path().unlink(missing_ok=True)
            self._tar = None

    def _path(self) -> Path:
        return self.out / shard_name(self.split, len(self.shards))

    def _tmp_path(self) -> Path:
        return self._path().with_name(self._path().name + ".tmp")

    def _open(self) -> None:
        # Closed in _finish_shard (or __exit__ on error): a shard spans many write() calls.
        self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = 0

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tar = None
        path = self._path()
        os.replace(self._tmp_path(), path)
        self.shards.append(ShardInfo(path.name, self._count, sha256_file(path)))
