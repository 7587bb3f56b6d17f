"""The bytes of one shard: from a local file, a URL, or this node's copy in `data.cache_dir`.

A shard is read whole into memory (the fast tar parser walks it in place), so a reader holds at
most two shards' bytes at a time: the one being parsed and, for remote shards, the next one,
fetched by a background thread (`prefetched`) so that the network overlaps the parsing. Samples
taken from a shard are copies, so its bytes are freed as soon as the parser moves on.

With `data.cache_dir`, a remote shard is downloaded once per node into `CACHE/<sha256>.tar`:
named by the digest meta.json records, so a file there is that shard whatever URL it came from,
and a shard that changed upstream is a new name, never a stale hit. Bytes are verified before
they are written (under a temporary name, then renamed: a reader never sees half a file), and
one lock file per shard makes the ranks and workers of a node wait for the one download in
flight instead of fetching the same shard again.
"""

from __future__ import annotations

import fcntl
import math
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsdist.data.checksum import remember_verified, remote_mismatch, shard_mismatch
from capsdist.data.fetch import STREAM_CHUNK, NotFound, read_bytes
from capsdist.data.tar import BLOCK
from capsdist.data.urls import DataError, is_remote, join


@dataclass(frozen=True)
class ShardTask:
    """One shard to read: where (path, URL or `pipe:` command), its sample count and sha256 per
    meta.json, how many samples to take, and the node's cache folder for remote shards."""

    url: str
    expected: int
    limit: int
    sha256: str
    cache_dir: str = ""
    max_bytes: int = 0  # what meta.json implies at most (raw pixels, tar headers); 0: unknown


def shard_tasks(
    root: str,
    meta: dict[str, Any],
    names: Sequence[str],
    max_examples: int = 0,
    *,
    urls: Sequence[str] | None = None,
    cache_dir: str = "",
) -> list[ShardTask]:
    """These shards of `root` (or at `urls`, one per name) with the samples to take from each
    (all, unless max_examples). Local shards must exist; remote ones are found when read."""
    tasks, left = [], max_examples if max_examples > 0 else math.inf
    image_bytes = math.prod(meta["image_shape"]) + math.prod(meta.get("recon_shape") or [0])
    for i, name in enumerate(names):
        url = urls[i] if urls is not None else join(root, name)
        if not is_remote(url) and not os.path.isfile(url):
            raise DataError(f"{url}: shard listed in meta.json is missing")
        size = meta["shard_sizes"][name]
        take = int(min(size, left))
        if take > 0:
            # Per sample: the pixels (PNG/JPEG are smaller) and up to 3 members' headers + padding.
            most = size * (image_bytes + 6 * BLOCK) + 2 * BLOCK
            tasks.append(ShardTask(url, size, take, meta["shards"][name], cache_dir, most))
        left -= take
    return tasks


@dataclass
class LoadedShard:
    """A shard's bytes, or why there are none; `mismatch()` checks them against meta.json."""

    task: ShardTask
    data: bytes | None = None
    problem: str | None = None  # missing or unreadable: the whole shard is bad
    local: tuple[str, os.stat_result] | None = None  # the file read, for checksum markers
    verified: bool = False
    remote_problem: str | None = None  # a remote shard's digest, compared when it was fetched

    def release(self) -> None:
        """Drop the bytes once parsed: the caller's loop variable would otherwise keep a third
        shard alive while the next one is parsed and the one after it fetched."""
        self.data = None

    def mismatch(self) -> str | None:
        """None if the bytes are the shard meta.json describes, else the message."""
        if self.local is not None and not self.verified:
            return shard_mismatch(*self.local, self.data, self.task.sha256)
        return self.remote_problem


def load(task: ShardTask) -> LoadedShard:
    """Read `task`'s shard: NotFound and unreadable files become `problem`s (skippable);
    unreachable servers and missing credentials raise DataError (fetch.py)."""
    if not is_remote(task.url):
        return _load_file(task, task.url)
    if task.cache_dir:
        return _load_cached(task)
    try:
        data = read_bytes(task.url, _large(task))
    except NotFound as exn:
        return LoadedShard(task, problem=str(exn))
    # Hashed here, in the prefetch thread: hashlib releases the GIL, so this overlaps the
    # parsing of the previous shard (the reader still names parse errors first).
    return LoadedShard(task, data, remote_problem=remote_mismatch(task.url, data, task.sha256))


def _load_file(task: ShardTask, path: str) -> LoadedShard:
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())  # of the file read, even if the path is replaced meanwhile
            return LoadedShard(task, f.read(), local=(path, stat))
    except OSError as exn:
        return LoadedShard(task, problem=f"{path}: cannot read the shard ({exn.strerror or exn})")


def _load_cached(task: ShardTask) -> LoadedShard:
    folder = Path(task.cache_dir)
    path = folder / f"{task.sha256}.tar"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{task.sha256}.lock", "wb")  # noqa: SIM115 (closed in finally)
    except OSError as exn:
        raise DataError(f"data.cache_dir={task.cache_dir}: not writable ({exn})") from exn
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker's download of this shard first
        if path.exists():
            cached = _load_file(task, str(path))
            if cached.problem is None and cached.mismatch() is None:  # a marker: no hashing
                cached.verified = True
                return cached
            path.unlink(missing_ok=True)  # damaged on this disk since it was checked: refetch
        try:
            data = read_bytes(task.url, _large(task))
        except NotFound as exn:
            return LoadedShard(task, problem=str(exn))
        problem = remote_mismatch(task.url, data, task.sha256)
        if problem:  # never cached: the next run asks the server again
            return LoadedShard(task, problem=problem)
        _write_atomic(path, data, task.sha256)
        return LoadedShard(task, data, verified=True)
    finally:
        lock.close()


def _large(task: ShardTask) -> bool:
    return task.max_bytes == 0 or task.max_bytes > STREAM_CHUNK


def _write_atomic(path: Path, data: bytes, sha256: str) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        remember_verified(str(path), os.stat(path), sha256)
    except OSError as exn:  # a full disk: train on, from the network
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        print(f"capsdist data: cannot keep {path} ({exn}); reading on", file=sys.stderr)


class _Background:
    """`fn(arg)` in a daemon thread (a thread pool would keep a dying process waiting on a
    download in retry); `result()` waits and re-raises its exception here."""

    def __init__(self, fn: Callable[[ShardTask], LoadedShard], arg: ShardTask):
        self._result: LoadedShard | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, arg), daemon=True)
        self._thread.start()

    def _run(self, fn, arg) -> None:
        try:
            self._result = fn(arg)
        except BaseException as exn:  # handed to the consumer, which raises it
            self._error = exn

    def result(self) -> LoadedShard:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def prefetched(tasks: Sequence[ShardTask]) -> Iterator[LoadedShard]:
    """`load(task)` for each task, in order; remote shards are fetched one ahead."""
    if not any(is_remote(t.url) for t in tasks):
        yield from map(load, tasks)
        return
    ahead = _Background(load, tasks[0]) if tasks else None
    for i in range(len(tasks)):
        current = ahead
        ahead = _Background(load, tasks[i + 1]) if i + 1 < len(tasks) else None
        yield current.result()
