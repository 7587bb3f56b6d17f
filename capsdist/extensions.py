"""Building C++ extensions with torch's JIT loader without ever hanging on a killed build.

`torch.utils.cpp_extension.load` guards each extension's build directory with a FileBaton: a
`lock` file created with O_EXCL on every load and removed when the load ends. A process killed
while it compiles (Ctrl-C, SIGKILL, a scheduler's time limit) leaves that file behind, and every
later load of the extension then waits for it forever, printing nothing (torch 2.13; issue 12).

So every capsdist load of an extension (the routing kernel, DeepSpeed's CPU comm op) first takes
an `fcntl.flock` on `<name>.build-lock` beside the build directory. The kernel releases a flock
when its holder dies, so this lock cannot go stale; and while we hold it no other capsdist process
can be inside torch's baton, so a baton found then was left by a dead build and is removed.
(A program other than capsdist building into the same directory does not take our lock: that is
the one case where a live baton could be removed.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

QUIET_WAIT_S = 2.0
"""Waits shorter than this are not reported: ranks that load an already built extension at the
same moment queue for well under a second."""


@contextlib.contextmanager
def build_lock(name: str) -> Iterator[Path]:
    """Hold the build lock of torch extension `name` (waiting, with one line on stderr, while
    another process holds it); yields the extension's build directory, free of stale batons."""
    # Private, but it is the very function load() uses: same TORCH_EXTENSIONS_DIR rules.
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(name, verbose=False))
    lock_path = build_dir.with_name(f"{name}.build-lock")
    with open(lock_path, "a+") as lock_file:  # closing it releases the lock
        _acquire(lock_file, f"{name} in {build_dir}")
        lock_file.truncate(0)  # "a+" appends: the holder's line is the file's only line
        lock_file.write(f"{os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
        _remove_stale_baton(build_dir)
        yield build_dir


def _acquire(lock_file: IO[str], what: str) -> None:
    deadline = time.monotonic() + QUIET_WAIT_S
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    holder = Path(lock_file.name).read_text().strip()
    who = f"PID {holder}" if holder else "another process"
    print(f"waiting for {who} building {what}", file=sys.stderr, flush=True)
    fcntl.flock(lock_file, fcntl.LOCK_EX)


def _remove_stale_baton(build_dir: Path) -> None:
    baton = build_dir / "lock"
    if baton.exists():
        baton.unlink(missing_ok=True)
        print(
            f"removed stale torch build lock {baton} (left by a build that was killed)",
            file=sys.stderr,
            flush=True,
        )


def cpu_feature_key(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """8 hex digits naming this CPU's instruction set: a hash of the machine type, torch's SIMD
    level and the CPU flags of `cpuinfo`. Extensions built with -march=native are cached under a
    name per key, so nodes of different CPU generations that share a home directory never load
    a binary built for another. (Flags that do not change the instruction set can split one CPU
    kind into two keys; that costs one extra build, never a wrong binary.)"""
    import torch

    parts = [platform.machine(), torch.backends.cpu.get_cpu_capability(), _cpu_flags(cpuinfo)]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:8]


def _cpu_flags(cpuinfo: Path) -> str:
    """The first `flags` line (x86) or `Features` line (ARM) of cpuinfo; "" where there is none
    (not Linux): the machine type and torch's SIMD level then tell CPU kinds apart."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return " ".join(sorted(value.split()))
    return ""
