"""Training inside Ray: one sweep trial, and the workers of `LAUNCHER=ray`.

A sweep trial runs the same `run_training` as `capsdist train`, with the trial's values as
config overrides, reporting to Ray Tune from the training callback. With
`sweep.workers_per_trial` = 1 the trial trains inside its Tune process. With more, the Tune
process only drives a Ray Train run of that many workers (DeepSpeed data parallel across them);
every worker reports to Ray Train, which hands rank 0's metrics on to Tune.

`launch/ray_train.py` runs `ray_launch_worker` in every Ray Train worker: the run's last
reported checkpoint is put back into run.dir where missing, then the loop trains and reports
each complete checkpoint (capsdist/tune/checkpoints.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from capsdist.config import Config, load_config
from capsdist.data import read_meta
from capsdist.train import on_every_rank, run_training
from capsdist.tune.checkpoints import CheckpointReporter, prepare_run_dir
from capsdist.tune.spec import format_override
from capsdist.tune.storage import ray_storage
from capsdist.viz import FigureCallback

# Set by export_rendezvous with os.environ.setdefault: a worker process that ran an earlier
# trial (or a driver started under torchrun) would otherwise hand its MASTER_PORT and rank to
# this trial's single-process DeepSpeed group.
RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TrialBase:
    """What every trial shares (picklable; all paths absolute, because Ray runs trials in
    their own working directory)."""

    configs: tuple[str, ...]
    overrides: tuple[str, ...]
    runs_dir: str
    metric: str
    group: str
    tags: tuple[str, ...] = field(default_factory=tuple)
    figures: bool = False
    workers: int = 1
    """Ray Train workers per trial; 1 = train in the Tune trial's own process."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def trial_overrides(self, params: dict, trial_id: str) -> list[str]:
        """Fixed overrides, then the trial's values, then where it writes and how W&B files it."""
        run_dir = Path(self.runs_dir) / trial_id
        tags = "[" + ",".join(self.tags) + "]"
        return [
            *self.overrides,
            *(format_override(k, v) for k, v in params.items()),
            f"run.dir={run_dir}",
            f"wandb.group={self.group}",
            f"wandb.tags={tags}",
        ]


def train_trial(params: dict, base: TrialBase) -> None:
    """Ray Tune function trainable: train one config, report `base.metric` as it goes."""
    trial_id = tune.get_context().get_trial_id()
    cfg = load_config(base.configs, base.trial_overrides(params, trial_id))
    if base.workers == 1:
        for key in RENDEZVOUS_VARS:
            os.environ.pop(key, None)
        train_and_report({"cfg": cfg, "base": base}, tune.report)
        return
    storage_path, name = ray_storage(cfg.ray.storage_path, cfg.run.dir, trial_id)
    torch_trainer(
        _ray_train_worker,
        {"cfg": cfg, "base": base},
        num_workers=base.workers,
        cpus_per_worker=base.cpus_per_worker,
        gpus_per_worker=base.gpus_per_worker,
        name=name,
        storage_path=storage_path,
        callbacks=[TuneReportCallback()],
    ).fit()


def _ray_train_worker(config: dict) -> None:
    train_and_report(config, ray.train.report)


def train_and_report(config: dict, report) -> None:
    """Run the training loop; `report` the metrics of every log line that has `base.metric`."""
    cfg, base = config["cfg"], config["base"]
    reported = []

    @on_every_rank  # Ray Train's report waits for every worker; rank 0's metrics go to Tune
    def report_metrics(step: int, metrics: dict[str, float], model) -> None:
        # ASHA and the best-trial choice need the metric in every result: report only those.
        if base.metric in metrics:
            report({**metrics, "step": step, "run_dir": cfg.run.dir})
            reported.append(step)

    callbacks = [report_metrics]
    meta = read_meta(cfg.data.root)
    if base.figures:
        callbacks.insert(0, FigureCallback(cfg, meta))
    result = run_training(cfg, callbacks, meta)
    if not reported:  # a trial resumed after it had finished logs nothing: report its result
        report({**result, "run_dir": cfg.run.dir})


def ray_launch_worker(config: dict) -> dict:
    """One Ray Train worker of `launch/ray_train.py`: restore, train, report checkpoints.
    Returns the training result (Ray hands rank 0's to the driver)."""
    cfg: Config = config["cfg"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    node = ray.get_runtime_context().get_node_id()
    print(
        f"ray worker rank {rank}/{world_size} local rank {ctx.get_local_rank()} pid "
        f"{os.getpid()} node {ray.util.get_node_ip_address()} ({node[:12]}) "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}",
        flush=True,
    )
    restored = prepare_run_dir(Path(cfg.run.dir), rank, world_size)
    if restored is not None:
        print(f"rank {rank}: restored Ray Train's checkpoint of step {restored}", flush=True)
    reporter = CheckpointReporter(cfg.run.dir, rank, cfg.train.keep_last)
    return run_training(cfg, [reporter])


def gpus_per_worker(configured: float, cluster_resources: dict) -> float:
    """ray.gpus_per_worker, with -1 (auto) decided by the cluster: 1 when it has GPUs (whichever
    node the driver runs on: under `ray job submit` that is often a CPU-only head), else 0."""
    if configured >= 0:
        return configured
    return 1.0 if cluster_resources.get("GPU", 0) > 0 else 0.0


def torch_trainer(
    worker: Callable[[dict], object],
    worker_config: dict,
    *,
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    name: str,
    storage_path: str,
    callbacks: Sequence = (),
    max_failures: int = 0,
    placement_strategy: str = "PACK",
    num_to_keep: int | None = None,
):
    """A Ray Train `TorchTrainer` running `worker(worker_config)` on `num_workers` workers.

    Ray Train starts the workers, sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR and joins
    them in a torch process group (gloo on CPU, NCCL on GPU); each worker then runs the same
    training loop as every other launcher. With a GPU per worker (or a share of one), Ray sets
    CUDA_VISIBLE_DEVICES to the GPUs of all workers on the node, ordered as the local ranks, so
    `pick_device` takes the local rank's (one visible: cuda:0). After a worker dies, Ray Train
    restarts the whole group up to `max_failures` times. Used by sweeps with
    `sweep.workers_per_trial > 1` and by `launch/ray_train.py`.
    """
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        worker,
        train_loop_config=worker_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
    )
