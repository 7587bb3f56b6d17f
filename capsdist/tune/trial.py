"""One sweep trial: the same `run_training` as `capsdist train`, with the trial's values as
config overrides, reporting to Ray Tune from the training callback.

With `sweep.workers_per_trial` = 1 the trial trains inside its Tune process. With more, the Tune
process only drives a Ray Train run of that many workers (DeepSpeed data parallel across them);
every worker reports to Ray Train, which hands rank 0's metrics on to Tune.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
from ray import tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from capsdist.config import load_config
from capsdist.data import read_meta
from capsdist.train import on_every_rank, run_training
from capsdist.tune.spec import format_override
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
    torch_trainer(
        _ray_train_worker,
        {"cfg": cfg, "base": base},
        num_workers=base.workers,
        cpus_per_worker=base.cpus_per_worker,
        gpus_per_worker=base.gpus_per_worker,
        name=trial_id,
        storage_path=str(Path(cfg.run.dir) / "ray"),
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
    """A Ray Train `TorchTrainer` running `worker(worker_config)` on `num_workers` workers.

    Ray Train starts the workers, sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR and joins
    them in a torch process group (gloo on CPU, NCCL on GPU); each worker then runs the same
    training loop as every other launcher. Used by sweeps with `sweep.workers_per_trial > 1` and
    by `launch/ray_train.py`.
    """
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
