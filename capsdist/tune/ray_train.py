"""A Ray Train `TorchTrainer` for capsdist workers (imports Ray: load it lazily).

Ray Train starts the workers, sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR and joins them
in a torch process group (gloo on CPU, NCCL on GPU); each worker then runs the same training
loop as every other launcher. Used by `launch/ray_train.py` and by sweeps with
`sweep.workers_per_trial > 1`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def torch_trainer(
    worker: Callable[[dict], None],
    worker_config: dict,
    *,
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    name: str,
    storage_path: str,
    callbacks: Sequence = (),
):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        worker,
        train_loop_config=worker_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks)),
    )
