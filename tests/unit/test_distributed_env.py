"""Who a process is and which device it trains on, for every launcher's environment. Pure
functions of the environment and the number of visible GPUs: no GPU is needed to test them."""

from __future__ import annotations

import pytest

from capsdist.distributed import DistEnv
from capsdist.distributed.env import cuda_index

# (launcher, its variables for the process with global rank 5 on its node's local rank 1)
LAUNCHERS = {
    "torchrun": {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"},
    "deepspeed": {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"},
    "ray_train": {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"},
    "srun": {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"},
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_every_launcher_gives_the_same_rank(launcher):
    assert DistEnv.from_environ(LAUNCHERS[launcher]) == DistEnv(5, 1, 8)


def test_torchrun_variables_win_over_slurms_under_srun_torchrun():
    """torchrun started by srun: SLURM_* describe the srun task, RANK/... the worker."""
    both = {**LAUNCHERS["srun"], "RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}
    assert DistEnv.from_environ(both) == DistEnv(3, 0, 4)


def test_nothing_set_is_a_single_process():
    assert DistEnv.from_environ({}) == DistEnv(0, 0, 1)


@pytest.mark.parametrize(
    ("local_rank", "visible", "expected"),
    [
        (0, 0, None),  # no GPU: the CPU
        (3, 0, None),
        (0, 1, 0),  # one GPU bound per task (sbatch --gpus-per-task=1): always cuda:0
        (3, 1, 0),
        (0, 8, 0),  # every GPU of the node visible (torchrun, deepspeed): the local rank's
        (3, 8, 3),
        (7, 8, 7),
    ],
)
def test_cuda_device_follows_what_the_process_can_see(local_rank, visible, expected):
    assert cuda_index(local_rank, visible) == expected


@pytest.mark.parametrize(
    ("allocation", "visible_devices", "expected"),
    [
        # sbatch --gpus-per-node=4 --ntasks-per-node=4: every task sees the node's 4 GPUs
        ("--gpus-per-node", "0,1,2,3", [0, 1, 2, 3]),
        # sbatch --gpus-per-task=1 (or srun --gpu-bind=single:1): each task sees its own one
        ("--gpus-per-task", None, [0, 0, 0, 0]),
    ],
)
def test_each_srun_task_gets_a_gpu_of_its_own(allocation, visible_devices, expected):
    """Four tasks on one node, as srun starts them: rank and local rank from SLURM_*, the
    visible GPUs from CUDA_VISIBLE_DEVICES as SLURM sets it (what torch.cuda counts)."""
    devices = []
    for local in range(4):
        environ = {"SLURM_PROCID": str(4 + local), "SLURM_LOCALID": str(local), "SLURM_NTASKS": "8"}
        visible = (visible_devices or str(local)).split(",")  # per task: only its own GPU
        env = DistEnv.from_environ(environ)
        assert env == DistEnv(4 + local, local, 8)
        devices.append(cuda_index(env.local_rank, len(visible)))
    assert devices == expected, allocation


def test_more_local_ranks_than_visible_gpus_is_named(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(
        RuntimeError, match=r"local rank 2 .* only 2 GPUs .*CUDA_VISIBLE_DEVICES=0,1"
    ):
        cuda_index(2, 2)
