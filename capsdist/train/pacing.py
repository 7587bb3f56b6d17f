"""The training clock and what follows from it, the same on every rank.

- `train_time_s`: seconds of training so far (this job's and, after a resume, the earlier jobs'),
  in-loop evaluations excluded (they are counted apart, `eval_time_s`); train.time_limit_s
  counts the same seconds (this job's).
- When to evaluate (train.eval_every_s): at the first log step after every N training seconds.
- The run's progress, 0 → 1: step / train.max_steps, or, under train.time_limit_s, from the
  progress the job started at (0, or its checkpoint's) up to 1 at the step where the time is
  expected to run out, re-estimated from the steps per second so far. The budget learning rate
  schedules (train.lr_schedule = onecycle | cosine) follow it (distributed/schedules.py) and
  data.shift_until is a fraction of it.

Ranks must agree on all of these (replicas whose learning rates differ diverge), with no
collective of their own: they are decided at sync steps from the main rank's clock, which
reaches every rank in the all-reduce the loop makes there anyway (train/loop.py `sync_ranks`).
The progress, the horizon, the training and the evaluation seconds travel with every checkpoint
(`state`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from capsdist.config import Config
from capsdist.distributed.schedules import progress_at, set_horizon


class Pacer:
    """The clock of one training job. `clock` is for tests (time.monotonic otherwise)."""

    def __init__(
        self,
        cfg: Config,
        start_step: int,
        saved: dict | None = None,
        scheduler=None,
        set_shift: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`saved`: the `state()` of the checkpoint this job resumed from ({} for a new run).
        `scheduler`: the engine's LambdaLR, whose budget schedule follows the horizon.
        `set_shift(pixels)`: changes the training readers' shift (data.shift_until)."""
        saved = saved or {}
        self._train, self._shift = cfg.train, cfg.data.shift_pixels
        self._shift_until = cfg.data.shift_until
        self._scheduler, self._set_shift, self._clock = scheduler, set_shift, clock
        self._start_step = start_step
        self._earlier_s = float(saved.get("train_time_s", 0.0))
        self._earlier_eval_s = float(saved.get("eval_time_s", 0.0))
        self._job_eval_s = 0.0  # this job's seconds in in-loop evaluations, on this rank
        self._started = clock()
        self._rate_from: tuple[int, float] | None = None  # (step, seconds) after the 1st window
        self.train_time_s = self._earlier_s
        """Training seconds so far, as the main rank counted them at the last sync step."""
        max_steps = cfg.train.max_steps
        if cfg.train.time_limit_s > 0:
            # Until the first sync step's estimate: the horizon of the checkpoint, else none.
            total = saved.get("total_steps") or max_steps
            self._from = (start_step, float(saved.get("progress", start_step / max_steps)))
        elif "progress" in saved and saved.get("total_steps") != max_steps:
            # The job before aimed elsewhere (a time budget, another train.max_steps): go on
            # from its progress to the new end, without a jump in the learning rate.
            total, self._from = max_steps, (start_step, float(saved["progress"]))
        else:  # a function of the step alone: straight and resumed runs agree to the bit
            total, self._from = max_steps, (0, 0.0)
        self.total_steps = float(min(max(total, start_step), max_steps))
        """The step at which this run is expected to end."""
        if scheduler is not None:
            set_horizon(scheduler, self.horizon, step=start_step)
        self._next_eval_s = self._after(self.train_time_s)
        self.shifting = self._shift > 0
        self._update_shift(start_step)

    def start(self) -> None:
        """The job's training starts now (the setup before it is not training time)."""
        self._started = self._clock()
        self._job_eval_s = 0.0

    def job_seconds(self) -> float:
        """This job's training seconds on this rank (its clock; evaluations excluded)."""
        return self._clock() - self._started - self._job_eval_s

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Time inside is evaluation, not training (also on the ranks that wait for it)."""
        began = self._clock()
        try:
            yield
        finally:
            self._job_eval_s += self._clock() - began

    @property
    def eval_time_s(self) -> float:
        return self._earlier_eval_s + self._job_eval_s

    @property
    def horizon(self) -> tuple[int, float, float]:
        """(first step of the job, its progress, the step expected to end the run)."""
        return (*self._from, self.total_steps)

    def progress(self, step: int) -> float:
        """Where `step` lies between the start (0) and the expected end (1) of the run."""
        return progress_at(step, *self.horizon)

    def synced(self, step: int, main_job_seconds: float) -> None:
        """At a sync step, on every rank, with the main rank's job_seconds() (shared by the
        all-reduce): the training clock, the horizon and the shift move on."""
        self.train_time_s = self._earlier_s + main_job_seconds
        limit = self._train.time_limit_s
        if limit > 0 and step > self._start_step:
            self._estimate_horizon(step, main_job_seconds, limit)
        self._update_shift(step)

    def _estimate_horizon(self, step: int, seconds: float, limit: float) -> None:
        # Steps per second since the end of the job's first window (which also paid for
        # warming up: first-touch allocations, caches); the first window's own until then.
        since_step, since_s = self._rate_from or (self._start_step, 0.0)
        if self._rate_from is None:
            self._rate_from = (step, seconds)
        if seconds <= since_s or step <= since_step:
            return
        rate = (step - since_step) / (seconds - since_s)
        expected = step + rate * max(limit - seconds, 0.0)
        self.total_steps = float(min(max(expected, step), self._train.max_steps))
        if self._scheduler is not None:
            set_horizon(self._scheduler, self.horizon)

    def _update_shift(self, step: int) -> None:
        # data.shift_until=1 (the default) shifts for the whole run, also past its planned end.
        if self.shifting and self._shift_until < 1 and self.progress(step) >= self._shift_until:
            self.shifting = False
            if self._set_shift is not None:
                self._set_shift(0)

    def eval_due(self) -> bool:
        """Whether train.eval_every_s asks for an evaluation at this (log) step."""
        return self._train.eval_every_s > 0 and self.train_time_s >= self._next_eval_s

    def evaluated(self) -> None:
        """An evaluation happened at the last sync step: the next one is due N seconds on."""
        self._next_eval_s = self._after(self.train_time_s)

    def _after(self, seconds: float) -> float:
        every = self._train.eval_every_s
        return (math.floor(seconds / every) + 1) * every if every > 0 else math.inf

    def state(self, step: int) -> dict:
        """What the checkpoint of `step` carries, for the job that resumes from it (JSON-safe)."""
        return {
            "train_time_s": self.train_time_s,
            "eval_time_s": self.eval_time_s,
            "progress": self.progress(step),
            "total_steps": self.total_steps,
        }
