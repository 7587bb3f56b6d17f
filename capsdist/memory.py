"""Keep freed large blocks inside the process (glibc), so a training step stops page-faulting.

glibc serves each allocation above its mmap threshold (at most 32 MB by default) with a fresh
mmap and unmaps it on free. A CPU training step allocates and frees the same large tensors every
time (the CapsNet's votes and their gradient: 47 MB each at batch 64), so every step faults them
back in page by page: measured 45-60 ms of a ~575 ms MNIST step on 2 cores. With the thresholds
raised, freed blocks are reused, as jemalloc or tcmalloc would do. The process keeps its peak
memory instead of returning it to the OS.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; True if set. No-op off glibc, or where the user
    chose their own (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment)."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        )
    except (OSError, AttributeError):  # musl and other C libraries: leave their allocator be
        return False
