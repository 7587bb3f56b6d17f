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
    init_process_group,
    keep_freed_memory,
    leave_process_group,
    pick_device,
)
from capsdist.errors import UserError
from capsdist.eval import build_eval_reader, evaluate
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
from capsdist.track import (
    JsonlSink,
    MetricSink,
    ProgressBar,
    build_wandb_sink,
    log_model_artifact,
)
from capsdist.train.checkpoint import save_checkpoint
from capsdist.train.data_position import DataPosition, Streams, rank_batches
from capsdist.train.pacing import Pacer
from capsdist.train.start import build_start
from capsdist.train.step import (
    Tally,
    WindowStats,
    replica_report,
    sum_over_ranks,
    train_step,
)

# Called with (step, metrics, model) after every log line, on the main rank only unless marked
# with `on_every_rank`: Ray Tune reports this way, and figures are drawn from the live model.
# A callback may also have an `on_checkpoint(step, folder)` method, called (on the same ranks)
# once the checkpoint of `step` is complete on every rank: Ray Train checkpoints are reported so.
Callback = Callable[[int, dict[str, float], torch.nn.Module], None]


def on_every_rank(callback: Callback) -> Callback:
    """Run `callback` on every rank, not only the main one. Ray Train's report is a barrier
    that every worker must reach; the metrics (eval scores included) are the same on all."""
    callback.every_rank = True
    return callback


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf; nothing was saved from the broken state."""


class StopSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 ask the loop to stop, with a checkpoint and the
    exported weights, instead of killing the job: a scheduler's notice (SLURM
    `--signal=USR1@120`; SIGTERM on scancel or preemption, 30 s before SIGKILL by default) costs
    no finished step. The ranks agree on stopping at the next log or checkpoint step (within
    train.log_every steps; no per-step collective), so a signal that reaches one rank only
    stops them all at the same step. A second Ctrl-C raises KeyboardInterrupt at once. Python
    sets handlers in the main thread only: elsewhere (Ray Tune runs a trial in a thread)
    signals keep theirs."""

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
    position: DataPosition | None = None
    """Where this job's ranks read their data from (train/data_position.py)."""
    streams: Streams | None = None
    """This rank's readers: its own, and those rebuilding an old layout's streams."""
    pacer: Pacer | None = None
    """The training clock, the evaluations it asks for, the schedule's horizon (pacing.py)."""

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
    evaluates = cfg.train.eval_every or cfg.train.eval_every_s
    in_loop_examples = cfg.train.eval_examples or cfg.eval.max_examples
    eval_reader = (
        build_eval_reader(cfg, meta, device, max_examples=in_loop_examples) if evaluates else None
    )
    start = build_start(cfg, env, meta, layout, ds_config, reader)  # resume or warm start
    start_step = start.step
    t = Trainer(
        cfg,
        env,
        start.engine,
        reader,
        eval_reader,
        layout.accumulation,
        start_step,
        stop,
        callbacks=callbacks,
        position=start.position,
        streams=start.streams,
    )
    # After the resume: the horizon it carried sets the budget schedule's learning rate.
    scheduler, set_shift = t.engine.lr_scheduler, t.streams.set_shift_pixels
    t.pacer = Pacer(cfg, start_step, start.pacing, scheduler, set_shift)
    if env.is_main:
        print(config_to_yaml(cfg), file=sys.stderr, flush=True)  # the resolved config, once
        write_config(run_dir, cfg)
        write_json_atomic(run_dir / "deepspeed_config.json", ds_config)
        for line in start.notes:  # "resumed from … at step 20: world 2→1, ZeRO 1→2", …
            print(line, flush=True)
        write_status(run_dir, "running", start_step)
        t.sinks.append(JsonlSink(run_dir / "metrics.jsonl", resumed_at=start_step))
        config_dict = {**config_to_dict(cfg), "deepspeed": ds_config}
        wandb = build_wandb_sink(run_dir, cfg.wandb, config_dict, job_type="train")
        t.sinks += [wandb] if wandb else []
        t.bar = ProgressBar(cfg.train.max_steps, initial=start_step)
    return t


def train_loop(t: Trainer) -> dict:
    """Steps from t.start_step to train.max_steps; stops early (cleanly) at train.time_limit_s or
    on a stop signal received by any rank.

    Nothing is read back from the device between sync steps (log steps, checkpoint steps and
    the last one): loss and accuracy add up on the device, so a GPU never waits for the host
    (DeepSpeed's own per-step gradient-norm / overflow reads are switched off when nothing
    clips: build_deepspeed_config, docs/gpu.md).
    At a sync step every rank reads its window and casts its stop votes in one all-reduce
    (`sync_ranks`): a NaN loss is found there, before a checkpoint could save it, and a time
    limit (on the main rank's training clock) or a stop signal (on any rank) ends the run there,
    within train.log_every steps. The same all-reduce brings the main rank's clock to every
    rank, so they agree on what follows from it (evaluations by train.eval_every_s, the budget
    schedule's horizon, data.shift_until: pacing.py) without a collective of their own.
    """
    cfg, engine = t.cfg, t.engine
    batches = rank_batches(t.position, t.start_step, t.env.rank, cfg.train.batch_size, t.streams)
    window = WindowStats()
    pacer = t.pacer
    pacer.start()
    metrics: dict[str, float] = {}
    step = checked = t.start_step
    stop = 0
    while step < cfg.train.max_steps:
        for _ in range(t.accumulation):
            batch = next(batches)
            loss, correct = train_step(engine, batch, cfg.loss)
            window.add(loss, correct, batch.images.shape[0])  # on the device: no host sync
        step += 1
        log_step = step % cfg.train.log_every == 0 or step == cfg.train.max_steps
        checkpoint_step = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
        if log_step or checkpoint_step:
            # The main rank's clock decides, and reaches every rank in the sync (pacing.py).
            clock = pacer.job_seconds() if t.env.is_main else 0.0
            out_of_time = 0 < cfg.train.time_limit_s <= clock
            sync = (checked, step)
            tally, stop = sync_ranks(t, window, out_of_time, sync, reset=log_step, clock=clock)
            pacer.synced(step, tally.shared[0])
            checked = step
            if t.bar and cfg.train.time_limit_s > 0:  # the ETA of the time budget, not max_steps
                t.bar.set_total(round(pacer.total_steps))
        if step == cfg.train.max_steps:
            stop = 0  # finished: a stop asked for during the last step changes nothing
        last = step == cfg.train.max_steps or stop > 0
        if log_step or last:
            # After the sync, so the device has finished every step counted.
            elapsed = pacer.job_seconds()
            images_per_s = (step - t.start_step) * cfg.train.batch_size / max(elapsed, 1e-9)
            metrics = log_metrics(t, step, tally, images_per_s, last)
        if t.bar:
            t.bar.update(1, **(_progress_fields(metrics) if log_step or last else {}))
        every = cfg.train.checkpoint_every
        if last or (every and step % every == 0):
            folder = save_checkpoint(
                engine, t.ckpt_dir, step, cfg, t.env, t.position, pacing=pacer.state(step)
            )
            for callback in t.callbacks:
                if hasattr(callback, "on_checkpoint") and (
                    t.env.is_main or getattr(callback, "every_rank", False)
                ):
                    callback.on_checkpoint(step, folder)
        if last:
            break
    if step == t.start_step:  # resumed a run that had already reached max_steps
        return _previous_result(Path(cfg.run.dir))
    return {
        "step": step,
        "loss": metrics["loss"],
        "train_accuracy": metrics["train_accuracy"],
        "images_per_s": metrics["images_per_s"],
        "train_time_s": pacer.train_time_s,
        "run_dir": str(cfg.run.dir),
        **{k: v for k, v in metrics.items() if k.startswith("eval_")},
        **({"stopped": signal.Signals(stop).name} if stop > 1 else {}),
    }


def log_metrics(
    t: Trainer, step: int, tally: Tally, images_per_s: float, last: bool
) -> dict[str, float]:
    """The metrics of the window since the last log line (and the evaluation when due), handed
    to the sinks and the callbacks."""
    metrics = {
        "loss": tally.loss,
        "train_accuracy": tally.accuracy,
        "images_per_s": images_per_s,
        "lr": t.engine.get_lr()[0],
        "train_time_s": t.pacer.train_time_s,
    }
    if t.cfg.train.time_limit_s > 0:
        metrics["horizon_steps"] = t.pacer.total_steps  # where the schedule now ends
    if t.cfg.data.on_error == "skip":
        metrics["data_skipped"] = sum_over_ranks(t.reader.num_skipped)
    every = t.cfg.train.eval_every
    if t.eval_reader and ((every and step % every == 0) or t.pacer.eval_due() or last):
        with t.pacer.evaluation():  # not training time (train.eval_every_s, time_limit_s)
            metrics.update(evaluate_on_main(t))
        t.pacer.evaluated()
        metrics["eval_time_s"] = t.pacer.eval_time_s
    for sink in t.sinks:  # only the main rank has sinks
        sink.log(step, metrics)
    for callback in t.callbacks:
        if t.env.is_main or getattr(callback, "every_rank", False):
            callback(step, metrics, t.engine.module)
    return metrics


def sync_ranks(
    t: Trainer,
    window: WindowStats,
    out_of_time: bool,
    steps: tuple[int, int],
    reset: bool,
    clock: float = 0.0,
) -> tuple[Tally, int]:
    """At a sync step, on every rank: the window's statistics over all ranks and the agreed stop
    code (0 = go on, 1 = out of time, else the number of a stop signal that some rank received),
    from one all-reduce, which also sums `clock` over the ranks (the main rank passes its
    training seconds, the others 0: `tally.shared[0]` is the main rank's clock on every rank).
    Raises NonFiniteLossError on every rank if any rank's loss was NaN/inf since the last sync
    step (`steps` = (that step, this one))."""
    votes = [t.stop.signum == sig for sig in StopSignals.SIGNALS] + [out_of_time]
    tally = window.tally(votes, reset=reset, shared=[clock])
    if not math.isfinite(tally.loss):
        raise NonFiniteLossError(
            f"the training loss became {tally.loss} between step {steps[0]} and step {steps[1]} "
            f"(checked every train.log_every steps); the last good checkpoint in {t.ckpt_dir} "
            "is kept: lower train.lr or use ds.precision=fp32/bf16, then rerun"
        )
    *signalled, timed_out = tally.votes
    received = [sig for sig, count in zip(StopSignals.SIGNALS, signalled, strict=True) if count]
    return tally, int(received[0]) if received else int(timed_out > 0)


def _progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's figures: those of the last log line (reading the live loss at every
    step would make a GPU wait for the host)."""
    return {
        "loss": f"{metrics['loss']:.4f}",
        "acc": f"{metrics['train_accuracy']:.3f}",
        "img_s": f"{metrics['images_per_s']:.0f}",
    }


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
        # The weights as a W&B model artifact (config, step and accuracies as its metadata).
        state = "stopped" if "stopped" in result else "final"
        metadata = {**result, "config": config_to_dict(t.cfg)}
        aliases = [state, f"step-{result['step']}"]
        log_model_artifact(t.sinks, run_dir / WEIGHTS, run_dir, aliases, metadata)
    if dist.is_initialized() and t.env.world_size > 1:
        # Every rank leaves together: a launcher that ends the job when its first rank exits
        # (srun --kill-on-bad-exit after a stop's exit 75) would cut the main rank's export short.
        dist.barrier()
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
