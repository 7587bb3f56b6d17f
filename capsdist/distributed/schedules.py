"""Learning-rate schedules for a fixed budget (train.lr_schedule = onecycle | cosine).

The reference's exponential decay (`ReferenceDecay`, engine.py) is built for 300k steps; a run
of minutes wants the whole rise and fall of the learning rate inside its budget. Here the factor
on train.lr is a function of the run's progress p in [0, 1]: step / train.max_steps, or, under
train.time_limit_s, p rises linearly from the job's first step to the step at which the loop
now expects the time to run out (train/pacing.py re-estimates it at sync steps, identically on
every rank). A resumed job starts from the progress its checkpoint had reached, so the learning
rate continues where it was, and spreads the rest of the schedule over its own budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from capsdist.config.schema import TrainConfig


@dataclass
class BudgetSchedule:
    """lr factor at progress p: a linear warm-up from `start_factor` to 1 over the first
    `warmup_frac`, then down to `final_factor` at p = 1, linearly (`onecycle`: Smith's 1cycle
    without momentum cycling; a linear decay is what "Budgeted Training", Li et al. 2020, found
    best for a fixed budget) or along a half cosine (`cosine`). Past the end it stays there.

    Plain fields only: LambdaLR saves a callable's __dict__ in its state, DeepSpeed saves that in
    its checkpoints, and those are read back weights-only (train/checkpoint.py).
    """

    shape: str
    warmup_frac: float
    start_factor: float
    final_factor: float
    total_steps: float
    """The step at which the schedule ends (p = 1); set by train/pacing.py."""
    start_step: int = 0
    """The first step of this job, where the progress is `start_progress`."""
    start_progress: float = 0.0
    """The progress at `start_step`: where the checkpoint this job resumed from had got to."""

    @classmethod
    def from_config(cls, train: TrainConfig) -> BudgetSchedule:
        return cls(
            train.lr_schedule,
            train.warmup_frac,
            train.lr_start_factor,
            train.lr_final_factor,
            float(train.max_steps),
        )

    def __call__(self, step: int) -> float:
        progress = progress_at(step, self.start_step, self.start_progress, self.total_steps)
        if progress < self.warmup_frac:
            return self.start_factor + (1 - self.start_factor) * progress / self.warmup_frac
        down = (progress - self.warmup_frac) / (1 - self.warmup_frac)  # 0 → 1 after the warm-up
        if self.shape == "cosine":
            down = 0.5 * (1 - math.cos(math.pi * down))
        return 1 - (1 - self.final_factor) * down


def progress_at(step: int, start_step: int, start_progress: float, total_steps: float) -> float:
    """The progress at `step`: `start_progress` at `start_step`, rising linearly to 1 at
    `total_steps` (and staying there). With (0, 0, T): step / T."""
    if start_step == 0 and start_progress == 0:
        return min(step / max(total_steps, 1.0), 1.0)  # the same floats as a plain step / T
    left = total_steps - start_step
    if left <= 0:
        return 1.0
    return min(max(start_progress + (1 - start_progress) * (step - start_step) / left, 0.0), 1.0)


def set_horizon(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    horizon: tuple[int, float, float],
    step: int | None = None,
) -> None:
    """Give every BudgetSchedule of `scheduler` the `horizon` (start_step, start_progress,
    total_steps) of `progress_at`; other schedules ignore it. The learning rate of the step in
    progress stays unless `step` is given (after a resume): then it is recomputed at once, as
    LambdaLR would at that step."""
    schedules = [fn for fn in scheduler.lr_lambdas if isinstance(fn, BudgetSchedule)]
    start_step, start_progress, total_steps = horizon
    for schedule in schedules:
        schedule.start_step, schedule.start_progress = int(start_step), float(start_progress)
        schedule.total_steps = float(total_steps)
    if step is None or not schedules:
        return
    lrs = [
        base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
