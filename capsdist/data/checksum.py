"""Is a shard the file meta.json describes? Its sha256, checked once per machine.

meta.json records every shard's sha256 when `capsdist data` writes it. A shard changed later (a
test shard copied over a train shard, a half-finished copy, bit rot) may still parse and would
train silently, so the reader compares digests the first time it reads a shard. The digest is
taken over the bytes the reader has already read whole, one pass over memory (sha256 runs at
~1.4 GB/s here, some 10 % of reading MNIST-sized samples), and remembered, so that later epochs,
DataLoader workers (new processes every epoch) and later runs on this machine skip it.

Where it is remembered: one empty marker file per verified shard in `$CAPSDIST_CACHE_DIR`
(default `$XDG_CACHE_HOME/capsdist`, `~/.cache/capsdist`) under `verified-shards/`, named by a
hash of the shard's real path, inode, size, mtime and ctime and the digest meta.json records.
Not beside the shards: data roots are often read-only or shared between users. Marker files,
not one index file: ranks and workers verify at the same time, and creating a file needs no
lock. Replacing or writing a shard changes its ctime, which no user can set back, so a marker
never vouches for new bytes. Without a writable cache every read is verified: slower, still
correct. Its own variable, so that tests can move it without moving torch's extension cache
(which follows XDG_CACHE_HOME).

Remote shards streamed without `data.cache_dir` are verified on every read, from the bytes
already in memory: an object store offers no inode or ctime that would vouch for unchanged
bytes (an ETag would cost one more request per shard, and S3 multipart ETags are no digest).
Copies kept in `data.cache_dir` are verified once, before they are written there, and then are
local files like any other.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_home() -> Path:
    """capsdist's per-machine cache: `$CAPSDIST_CACHE_DIR`, else `$XDG_CACHE_HOME/capsdist`."""
    base = os.environ.get("CAPSDIST_CACHE_DIR")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "capsdist"
    return Path(base)


def cache_dir() -> Path:
    """Where the markers of verified shards live."""
    return cache_home() / "verified-shards"


def shard_mismatch(path: str, stat: os.stat_result, data: bytes, expected: str) -> str | None:
    """None when `data`, the bytes of shard `path` whose `os.fstat` is `stat`, have the sha256
    `expected` (or this very file had it when this machine last read it); else the message."""
    marker = _marker(path, stat, expected)
    if os.path.exists(marker):
        return None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        return (
            f"{path}: sha256 {actual}, but meta.json records {expected}: the shard was replaced "
            f"or changed after `capsdist data` wrote it; restore it, or rewrite the data set "
            f"with `capsdist data ... --out {Path(path).parent}`"
        )
    _touch(marker)
    return None


def remote_mismatch(url: str, data: bytes, expected: str) -> str | None:
    """None when `data`, read from `url`, have the sha256 `expected`; else the message (which
    does not suggest writing to `url`: a data root is often someone else's, read-only)."""
    actual = hashlib.sha256(data).hexdigest()
    if actual == expected:
        return None
    return (
        f"{url}: sha256 {actual}, but meta.json records {expected}: the object was replaced or "
        f"changed after its data set was written; restore it, or point data.root at a complete "
        f"copy of the data set"
    )


def remember_verified(path: str, stat: os.stat_result, expected: str) -> None:
    """Record that the file `path` (whose `os.stat` is `stat`) was verified to hold `expected`:
    for a copy written from bytes that were checked just before."""
    _touch(_marker(path, stat, expected))


def _touch(marker: Path) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # the marker only saves time: without it the next read hashes the shard again


def _marker(path: str, stat: os.stat_result, expected: str) -> Path:
    identity = (
        os.path.realpath(path),
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
        expected,
    )
    key = "\0".join(map(str, identity)).encode("utf-8", "surrogateescape")
    return cache_dir() / hashlib.sha256(key).hexdigest()
