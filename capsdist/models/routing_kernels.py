"""The fused CPU routing passes (routing_cpu.cpp), built on first use with torch's JIT extension
loader and cached (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR).

`cpu_kernels()` returns the module, or None (with one warning) where no C++ compiler or build
tool is available: routing then runs on torch ops, which give the same results, slower.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("routing_cpu.cpp")


@functools.cache
def cpu_kernels():
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="capsdist_routing_cpu",
            sources=[str(SOURCE)],
            # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header.
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as err:  # no compiler, no ninja, a read-only cache, ...
        warnings.warn(
            f"fused CPU routing unavailable, using torch ops (slower): {err!r:.300}",
            stacklevel=2,
        )
        return None
