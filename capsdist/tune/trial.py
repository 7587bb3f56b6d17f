"""One sweep trial, inside a Ray worker: the same `run_training` as `capsdist train`, with the
trial's values as config overrides, reporting to Ray Tune from the training callback."""

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

    from capsdist.train import run_training

    for key in RENDEZVOUS_VARS:
        os.environ.pop(key, None)
    trial_id = tune.get_context().get_trial_id()
    cfg = load_config(base.configs, base.trial_overrides(params, trial_id))
    reported = []

    def report(step: int, metrics: dict[str, float], model) -> None:
        # ASHA and the best-trial choice need the metric in every result: report only those.
        if base.metric in metrics:
            tune.report({**metrics, "step": step, "run_dir": cfg.run.dir})
            reported.append(step)

    callbacks = [report]
    if base.figures:
        from capsdist.viz.callback import FigureCallback

        callbacks.insert(0, FigureCallback(cfg))
    result = run_training(cfg, callbacks=callbacks)
    if not reported:  # a trial resumed after it had finished logs nothing: report its result
        tune.report({**result, "run_dir": cfg.run.dir})
