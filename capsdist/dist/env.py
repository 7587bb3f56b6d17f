"""Who this process is in the job: rank, local rank and world size, from any launcher."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


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
