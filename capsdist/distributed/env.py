"""Who this process is and where it runs: rank / local rank / world size from any launcher, the
one device picker, and the allocator setting every training process starts with."""

from __future__ import annotations

import ctypes
import os
import socket
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes logs, checkpoints, exports and W&B."""
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> DistEnv:
        """Read the rank from whichever launcher started us.

        torchrun, the DeepSpeed launcher and Ray Train set RANK/LOCAL_RANK/WORLD_SIZE; `srun`
        sets SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS. Nothing set means a single process.
        """
        env = os.environ if environ is None else environ
        for rank_key, local_key, world_key in (
            ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
            ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
        ):
            if rank_key in env and world_key in env:
                return cls(int(env[rank_key]), int(env.get(local_key, 0)), int(env[world_key]))
        return cls()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_rendezvous(env: DistEnv) -> None:
    """Fill in the variables torch.distributed needs when no launcher set them.

    A single process started with plain `python` has none, and DeepSpeed then falls back to
    probing MPI (mpi4py); `srun` sets SLURM_* but not RANK/WORLD_SIZE.
    """
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    if env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            f"world size {env.world_size} but MASTER_ADDR is not set: start the job with torchrun, "
            "the deepspeed launcher or `make launch`, which set it"
        )


def cuda_index(local_rank: int, visible_gpus: int) -> int | None:
    """Which of the GPUs this process can see it trains on; None without any. A launcher that
    binds one GPU per task (SLURM's --gpus-per-task, a per-rank CUDA_VISIBLE_DEVICES) leaves one
    visible, always `cuda:0` whatever the local rank; one that shows every GPU of the node
    (torchrun, the deepspeed launcher) means the local rank's."""
    if visible_gpus == 0:
        return None
    if visible_gpus == 1:
        return 0
    if local_rank < visible_gpus:
        return local_rank
    raise RuntimeError(
        f"local rank {local_rank} but this process sees only {visible_gpus} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at "
        "most one process per visible GPU, or give each process one GPU"
    )


def pick_device(local_rank: int = 0) -> torch.device:
    """The device of a process: its GPU (see `cuda_index`) when it sees any, else the CPU. The
    one place that decides it (training, eval, validate, ensembles, figures, benchmarks)."""
    index = cuda_index(local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return torch.device("cpu") if index is None else torch.device("cuda", index)


# Keep freed large blocks inside the process (glibc), so a training step stops page-faulting.
#
# glibc serves each allocation above its mmap threshold (at most 32 MB by default) with a fresh
# mmap and unmaps it on free. A CPU training step allocates and frees the same large tensors every
# time (the CapsNet's votes and their gradient: 47 MB each at batch 64), so every step faults them
# back in page by page: measured 45-60 ms of a ~575 ms MNIST step on 2 cores. With the thresholds
# raised, freed blocks are reused, as jemalloc or tcmalloc would do. The process keeps its peak
# memory instead of returning it to the OS.
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
