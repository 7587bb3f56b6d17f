"""The device the model tests run the fast model on: $CAPSDIST_TEST_DEVICE (default `cpu`).

`make gpu-check` sets it to `cuda`: the fast model then runs on the GPU while the references
(the plain CapsNet, plain routing) stay in fp64 on the CPU, so the GPU kernels are checked
against a CPU answer. Asking for a device that is not there fails: it must not pass silently.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

DEVICE = torch.device(os.environ.get("CAPSDIST_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("CAPSDIST_TEST_DEVICE=cuda, but torch sees no CUDA device")


def on_device(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Copies of `tensors` on DEVICE (leaves again if they required gradients)."""
    return tuple(t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in tensors)


@contextmanager
def conv_fp32(arithmetic: str):
    """fp32 convolutions in `ieee` or `tf32` arithmetic inside the block (a no-op on the CPU).
    On a GPU cuDNN uses TF32 for fp32 convolutions by default; checks at fp32 tolerance need
    `ieee`. torch >= 2.9 has a per-operator setting; mixing it with the older global flag
    raises, so the older flag is used only where the new setting does not exist."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=arithmetic == "tf32"):
            yield
        return
    before = conv.fp32_precision
    conv.fp32_precision = arithmetic
    try:
        yield
    finally:
        conv.fp32_precision = before


def ieee_fp32():
    """No TF32 in fp32 convolutions inside the block (matmuls are IEEE fp32 by default)."""
    return conv_fp32("ieee")
