"""`capsdist train`: the one training loop every launcher runs.

Setup in a fixed order (checks → run.dir lock → dist → data → model → engine → resume → sinks →
loop); the loop fits on one screen; sinks and the process group are closed in `finally`. A stop
signal ends the loop after the current step, with a checkpoint and the exported weights; any
other way out marks run.dir/status.json `failed`, with the error.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from capsdist.config import Config, config_to_dict, config_to_yaml
from capsdist.data import ShardReader, build_reader, check_data_matches_model, read_meta
from capsdist.distributed import (
    BatchLayout,
    DistEnv,
    build_deepspeed_config,
    build_engine,
    init_process_group,
    keep_freed_memory,
    leave_process_group,
    pick_device,
)
from capsdist.errors import UserError
from capsdist.eval import build_eval_reader, evaluate
from capsdist.models import build_model
from capsdist.run_dir import (
    CHECKPOINTS,
    STATUS,
    WEIGHTS,
    RunDirError,
    check_resumable,
    complete_checkpoints,
    copy_file_atomic,
    hold_run_dir,
    read_status,
    release_frames,
    remove_incomplete_checkpoints,
    storage_error,
    tag_for,
    write_config,
    write_json_atomic,
    write_status,
)
from capsdist.track import JsonlSink, MetricSink, ProgressBar, build_wandb_sink
from capsdist.train.checkpoint import load_latest, save_checkpoint
from capsdist.train.step import (
    WindowStats,
    any_rank,
    max_over_ranks,
    replica_report,
    sum_over_ranks,
    train_step,
)

# Called with (step, metrics, model) after every log line, on the main rank only unless marked
# with `on_every_rank`: Ray Tune reports this way, and figures are drawn from the live model.
Callback = Callable[[int, dict[str, float], torch.nn.Module], None]


def on_every_rank(callback: Callback) -> Callback:
    """Run `callback` on every rank, not only the main one. Ray Train's report is a barrier
    that every worker must reach; the metrics (eval scores included) are the same on all."""
    callback.every_rank = True
    return callback


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf; nothing was saved from the broken state."""


class StopSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 ask the loop to stop after the current step, with a
    checkpoint and the exported weights, instead of killing the job: a scheduler's notice (SLURM
    `--signal=USR1@120`; SIGTERM on scancel or preemption, 30 s before SIGKILL by default) costs
    no finished step. A second Ctrl-C raises KeyboardInterrupt at once. Python sets handlers in
    the main thread only: elsewhere (Ray Tune runs a trial in a thread) signals keep theirs."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, announce: bool = True):
        self.signum = 0
        """The first stop signal received; 0 = none."""
        self._announce = announce
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        # torchrun forwards the SIGINT it gets to its workers, which get the terminal's own too:
        # one Ctrl-C arrives twice within milliseconds. A person's second press comes later.
        if signum == signal.SIGINT and self.signum and time.monotonic() - self._first_at > 1.0:
            raise KeyboardInterrupt
        if self.signum:
            return
        self.signum, self._first_at = signum, time.monotonic()
        if self._announce:  # os.write, not print: the handler may interrupt a print to stderr
            name = signal.Signals(signum).name
            message = f"{name}: stopping after this step, with a checkpoint; Ctrl-C again quits now"
            os.write(sys.stderr.fileno(), f"\n{message}\n".encode())


@dataclass
class Trainer:
    """What the loop needs, built once by `build_trainer`."""

    cfg: Config
    env: DistEnv
    engine: object  # deepspeed.DeepSpeedEngine
    reader: ShardReader
    eval_reader: ShardReader | None
    accumulation: int
    start_step: int
    stop: StopSignals
    sinks: list[MetricSink] = field(default_factory=list)
    callbacks: Sequence[Callback] = ()
    bar: ProgressBar | None = None

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.run.dir) / CHECKPOINTS


def run_training(cfg: Config, callbacks: Sequence[Callback] = (), meta: dict | None = None) -> dict:
    """Train `cfg` to train.max_steps (or train.time_limit_s) and export the weights. `meta` is
    data.root's meta.json when the caller has read it already (it is read once per job). The job
    holds run.dir's lock throughout. A stop signal ends training early, resumably: the result
    then names it under `stopped`. A failure marks the run `failed` in status.json."""
    keep_freed_memory()  # before the first large allocation
    env = DistEnv.from_environ()
    run_dir = Path(cfg.run.dir)
    if meta is None:
        meta = read_meta(cfg.data.root)
    check_data_matches_model(meta, cfg)
    layout = BatchLayout.of(cfg, env.world_size)
    ds_config = build_deepspeed_config(cfg, layout)

    # Only the main rank writes run.dir, so only it holds the lock.
    with hold_run_dir(run_dir) if env.is_main else nullcontext(), StopSignals(env.is_main) as stop:
        check_resumable(run_dir, cfg)  # before anything in run.dir is written
        init_process_group(env)
        trainer = None
        try:
            trainer = build_trainer(cfg, env, meta, layout, ds_config, callbacks, stop)
            return finish(trainer, train_loop(trainer))
        except BaseException as err:
            problem = storage_error(err, run_dir)  # a full or read-only disk: one line
            if problem:
                release_frames(err)
            if env.is_main:
                _mark_failed(run_dir, problem or err)
            if problem:
                raise problem from err
            raise
        finally:
            if trainer and trainer.bar:
                trainer.bar.close()
            for sink in trainer.sinks if trainer else []:
                sink.close()
            leave_process_group()


def build_trainer(
    cfg: Config,
    env: DistEnv,
    meta: dict,
    layout: BatchLayout,
    ds_config: dict,
    callbacks: Sequence[Callback],
    stop: StopSignals,
) -> Trainer:
    """Data → model → engine → resume; then the main rank writes the config, marks the run
    `running` and opens the sinks."""
    run_dir = Path(cfg.run.dir)
    device = pick_device(env.local_rank)
    reader = build_reader(
        cfg,
        cfg.data.train_split,
        meta,
        train=True,
        batch_size=layout.micro_batch,
        rank=env.rank,
        world_size=env.world_size,
        device=device,
    )
    eval_reader = build_eval_reader(cfg, meta, device) if cfg.train.eval_every else None
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    engine = build_engine(build_model(cfg.model), cfg, env, ds_config)
    resumed = load_latest(engine, run_dir / CHECKPOINTS)
    start_step = resumed[0] if resumed else 0
    t = Trainer(
        cfg,
        env,
        engine,
        reader,
        eval_reader,
        layout.accumulation,
        start_step,
        stop,
        callbacks=callbacks,
    )
    if env.is_main:
        print(config_to_yaml(cfg), file=sys.stderr, flush=True)  # the resolved config, once
        write_config(run_dir, cfg)
        write_json_atomic(run_dir / "deepspeed_config.json", ds_config)
        if resumed:
            print(f"resumed from {t.ckpt_dir} at step {start_step}", flush=True)
        write_status(run_dir, "running", start_step)
        t.sinks.append(JsonlSink(run_dir / "metrics.jsonl", resumed_at=start_step))
        config_dict = {**config_to_dict(cfg), "deepspeed": ds_config}
        wandb = build_wandb_sink(run_dir, cfg.wandb, config_dict, job_type="train")
        t.sinks += [wandb] if wandb else []
        t.bar = ProgressBar(cfg.train.max_steps, initial=start_step)
    return t


def train_loop(t: Trainer) -> dict:
    """Steps from t.start_step to train.max_steps; stops early (cleanly) at train.time_limit_s or
    on a stop signal received by any rank, after the step in progress."""
    cfg, engine = t.cfg, t.engine
    batches = t.reader.batches(start=t.start_step * t.accumulation)
    window = WindowStats()
    started = time.monotonic()
    metrics: dict[str, float] = {}
    step, stop = t.start_step, 0
    while step < cfg.train.max_steps:
        for _ in range(t.accumulation):
            batch = next(batches)
            loss, correct = train_step(engine, batch, cfg.loss)
            window.add(loss, correct, batch.images.shape[0])
        step += 1
        if any_rank(not math.isfinite(float(loss))):
            raise NonFiniteLossError(
                f"loss is {float(loss)} at step {step}; the last good checkpoint in "
                f"{t.ckpt_dir} is kept: lower train.lr or use ds.precision=fp32/bf16, then rerun"
            )
        elapsed = time.monotonic() - started
        images_per_s = (step - t.start_step) * cfg.train.batch_size / max(elapsed, 1e-9)
        out_of_time = cfg.train.time_limit_s > 0 and elapsed >= cfg.train.time_limit_s
        # Every rank stops at the same step: one collective, as for the time limit alone (the
        # largest over ranks of 1 for out of time, or a stop signal's number, 2 or more).
        if step < cfg.train.max_steps:
            stop = max_over_ranks(t.stop.signum or int(out_of_time))
        last = step == cfg.train.max_steps or stop > 0
        if step % cfg.train.log_every == 0 or last:
            metrics = log_metrics(t, step, window, images_per_s, last)
        if t.bar:
            t.bar.update(
                1,
                loss=f"{float(loss):.4f}",
                acc=f"{metrics.get('train_accuracy', float('nan')):.3f}",
                img_s=f"{images_per_s:.0f}",
            )
        every = cfg.train.checkpoint_every
        if last or (every and step % every == 0):
            save_checkpoint(engine, t.ckpt_dir, step, cfg, t.env)
        if last:
            break
    if step == t.start_step:  # resumed a run that had already reached max_steps
        return _previous_result(Path(cfg.run.dir))
    return {
        "step": step,
        "loss": metrics["loss"],
        "train_accuracy": metrics["train_accuracy"],
        "images_per_s": metrics["images_per_s"],
        "run_dir": str(cfg.run.dir),
        **{k: v for k, v in metrics.items() if k.startswith("eval_")},
        **({"stopped": signal.Signals(stop).name} if stop > 1 else {}),
    }


def log_metrics(
    t: Trainer, step: int, window: WindowStats, images_per_s: float, last: bool
) -> dict[str, float]:
    """The metrics of the window since the last log line (and the evaluation when due), handed
    to the sinks and the callbacks."""
    loss_mean, accuracy = window.reduce()
    metrics = {
        "loss": loss_mean,
        "train_accuracy": accuracy,
        "images_per_s": images_per_s,
        "lr": t.engine.get_lr()[0],
    }
    if t.cfg.data.on_error == "skip":
        metrics["data_skipped"] = sum_over_ranks(t.reader.num_skipped)
    if t.eval_reader and (step % t.cfg.train.eval_every == 0 or last):
        metrics.update(evaluate_on_main(t))
    for sink in t.sinks:  # only the main rank has sinks
        sink.log(step, metrics)
    for callback in t.callbacks:
        if t.env.is_main or getattr(callback, "every_rank", False):
            callback(step, metrics, t.engine.module)
    return metrics


def finish(t: Trainer, result: dict) -> dict:
    """After the loop, on every rank: are the replicas identical? Then the main rank exports the
    last checkpoint's weights to run.dir and marks the run finished, or stopped (resumable)."""
    in_sync, shards_by_rank = replica_report(t.engine.module, t.reader.shards)
    result["replicas_in_sync"] = in_sync
    if t.env.is_main:
        run_dir = Path(t.cfg.run.dir)
        write_json_atomic(run_dir / "data_plan.json", {"shards_by_rank": shards_by_rank})
        copy_file_atomic(t.ckpt_dir / tag_for(result["step"]) / WEIGHTS, run_dir / WEIGHTS)
        write_json_atomic(run_dir / "train.json", result)
        if "stopped" in result:
            write_status(run_dir, "stopped", result["step"], reason=result["stopped"])
        else:
            write_status(run_dir, "finished", result["step"])
    return result


def _mark_failed(run_dir: Path, err: BaseException) -> None:
    """A `running` status.json (this job's, or one that a killed job left: this one holds the
    lock) becomes `failed`, with the error, at the newest checkpoint (where a rerun resumes). Any
    other status stays: the job failed before it changed the run. On a full disk the checkpoint
    cut short goes first, to make room. Best effort: the error on its way out matters more."""
    try:
        if read_status(run_dir).get("state") != "running":
            return
        if isinstance(err, RunDirError):
            remove_incomplete_checkpoints(run_dir / CHECKPOINTS)
        checkpoints = complete_checkpoints(run_dir / CHECKPOINTS)
        step = checkpoints[-1][0] if checkpoints else 0
        write_status(run_dir, "failed", step, error=f"{type(err).__name__}: {err}")
    except (OSError, ValueError) as write_err:
        warnings.warn(f"could not mark {run_dir / STATUS} failed: {write_err}", stacklevel=2)


def evaluate_on_main(t: Trainer) -> dict[str, float]:
    """Evaluate the live model on the main rank and hand its scores to every rank (the others
    wait in the broadcast), so every rank logs and reports the same metrics."""
    scores = {}
    if t.env.is_main:
        result = evaluate(t.engine.module, t.eval_reader, t.cfg, desc="validate")
        scores = {"eval_accuracy": result["accuracy"], "eval_loss": result["loss"]}
    if dist.is_initialized():
        shared = [scores]
        dist.broadcast_object_list(shared, src=0)
        scores = shared[0]
    return scores


def _previous_result(run_dir: Path) -> dict:
    path = run_dir / "train.json"
    if path.exists():  # without `stopped`: this job ends the run at the step it had reached
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "stopped"}
    nan = float("nan")
    return {
        "step": 0,
        "loss": nan,
        "train_accuracy": nan,
        "images_per_s": 0.0,
        "run_dir": str(run_dir),
    }
