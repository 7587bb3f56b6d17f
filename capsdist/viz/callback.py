"""Draw the figures at every evaluation of a training run: run.dir/figures/*.png + W&B images."""

from __future__ import annotations

from pathlib import Path

import torch

from capsdist.config import Config


class FigureCallback:
    """A training callback (`run_training(cfg, callbacks=[FigureCallback(cfg)])`).

    Draws when the metrics hold `eval_accuracy` (every train.eval_every steps and at the end),
    from a fixed batch of the evaluation split, so successive figures are comparable. The PNGs
    in run.dir/figures/ are the latest; W&B keeps every evaluation's (images by step), logged
    to the training loop's own W&B run when there is one.
    """

    def __init__(self, cfg: Config, max_confusion_batches: int = 10):
        self.cfg = cfg
        self.out_dir = Path(cfg.run.dir) / "figures"
        self.max_confusion_batches = max_confusion_batches
        self._reader = None
        self._batch = None

    def __call__(self, step: int, metrics: dict[str, float], model: torch.nn.Module) -> None:
        if "eval_accuracy" not in metrics:
            return
        from capsdist.viz.draw import draw_figures

        if self._reader is None:
            from capsdist.eval.evaluate import build_eval_reader

            device = next(model.parameters()).device
            self._reader = build_eval_reader(self.cfg, device)
            self._batch = next(iter(self._reader.epoch(0)))
        paths = draw_figures(
            model,
            self._batch.images,
            self.out_dir,
            labels=self._batch.labels,
            num_targets=self.cfg.model.num_targets,
            reader=self._reader,
            max_confusion_batches=self.max_confusion_batches,
            title=f"step {step}",
        )
        _log_to_active_wandb(step, paths)


def _log_to_active_wandb(step: int, paths: dict[str, Path]) -> None:
    """The training loop's W&B run is wandb.run in this process (None when W&B is off)."""
    import sys

    wandb = sys.modules.get("wandb")  # only if the loop imported it: never start W&B here
    if wandb is None or wandb.run is None:
        return
    from capsdist.track.sinks import log_images

    log_images(wandb.run, step, {f"figures/{name}": path for name, path in paths.items()})
