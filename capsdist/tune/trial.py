"""One sweep trial: the same `run_training` as `capsdist train`, with the trial's values as
config overrides, reporting to Ray Tune from the training callback.

With `sweep.workers_per_trial` = 1 the trial trains inside its Tune process. With more, the Tune
process only drives a Ray Train run of that many workers (DeepSpeed data parallel across them);
every worker reports to Ray Train, which hands rank 0's metrics on to Tune.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from capsdist.config import load_config
from capsdist.tune.spec import format_override

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
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = load_config(base.configs, base.trial_overrides(params, trial_id))
    if base.workers == 1:
        for key in RENDEZVOUS_VARS:
            os.environ.pop(key, None)
        train_and_report({"cfg": cfg, "base": base}, tune.report)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from capsdist.tune.ray_train import torch_trainer

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
    import ray.train

    train_and_report(config, ray.train.report)


def train_and_report(config: dict, report) -> None:
    """Run the training loop; `report` the metrics of every log line that has `base.metric`."""
    from capsdist.train import on_every_rank, run_training

    cfg, base = config["cfg"], config["base"]
    reported = []

    @on_every_rank  # Ray Train's report waits for every worker; rank 0's metrics go to Tune
    def report_metrics(step: int, metrics: dict[str, float], model) -> None:
        # ASHA and the best-trial choice need the metric in every result: report only those.
        if base.metric in metrics:
            report({**metrics, "step": step, "run_dir": cfg.run.dir})
            reported.append(step)

    callbacks = [report_metrics]
    if base.figures:
        from capsdist.viz.callback import FigureCallback

        callbacks.insert(0, FigureCallback(cfg))
    result = run_training(cfg, callbacks=callbacks)
    if not reported:  # a trial resumed after it had finished logs nothing: report its result
        report({**result, "run_dir": cfg.run.dir})
