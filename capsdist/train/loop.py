"""`capsdist train`: the one training loop every launcher runs.

Setup in a fixed order (checks → dist → data → model → engine → resume → sinks → loop); the
loop fits on one screen; sinks and the process group are closed in `finally`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from capsdist.config import Config, config_to_yaml
from capsdist.data import ShardReader, build_reader, check_data_matches_model, read_meta
from capsdist.distributed import (
    BatchLayout,
    DistEnv,
    build_deepspeed_config,
    build_engine,
    init_process_group,
    keep_freed_memory,
    pick_device,
)
from capsdist.errors import UserError
from capsdist.eval import build_eval_reader, evaluate
from capsdist.models import build_model
from capsdist.run_dir import (
    CHECKPOINTS,
    WEIGHTS,
    check_same_model,
    copy_file_atomic,
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


@dataclass
class Trainer:
    """What the loop needs, built once by `run_training`."""

    cfg: Config
    env: DistEnv
    engine: object  # deepspeed.DeepSpeedEngine
    reader: ShardReader
    eval_reader: ShardReader | None
    accumulation: int
    sinks: list[MetricSink] = field(default_factory=list)
    callbacks: Sequence[Callback] = ()
    bar: ProgressBar | None = None

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.run.dir) / CHECKPOINTS


def run_training(cfg: Config, callbacks: Sequence[Callback] = (), meta: dict | None = None) -> dict:
    """Train `cfg` to train.max_steps (or train.time_limit_s) and export the weights. `meta` is
    data.root's meta.json when the caller has read it already (it is read once per job)."""
    keep_freed_memory()  # before the first large allocation
    env = DistEnv.from_environ()
    run_dir = Path(cfg.run.dir)
    if meta is None:
        meta = read_meta(cfg.data.root)
    check_data_matches_model(meta, cfg)
    check_same_model(run_dir / CHECKPOINTS, cfg.model)  # before anything in run.dir is written
    layout = BatchLayout.of(cfg, env.world_size)
    ds_config = build_deepspeed_config(cfg, layout)

    init_process_group(env)
    trainer = None
    try:
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
        trainer = Trainer(
            cfg, env, engine, reader, eval_reader, layout.accumulation, callbacks=callbacks
        )
        if env.is_main:
            print(config_to_yaml(cfg), file=sys.stderr, flush=True)  # the resolved config, once
            write_config(run_dir, cfg)
            write_json_atomic(run_dir / "deepspeed_config.json", ds_config)
            if resumed:
                print(f"resumed from {trainer.ckpt_dir} at step {start_step}", flush=True)
            write_status(run_dir, "running", start_step)
            trainer.sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
            config_dict = {**asdict(cfg), "deepspeed": ds_config}
            wandb = build_wandb_sink(run_dir, cfg.wandb, config_dict, job_type="train")
            trainer.sinks += [wandb] if wandb else []
            trainer.bar = ProgressBar(cfg.train.max_steps, initial=start_step)
        result = train_loop(trainer, start_step)
        in_sync, shards_by_rank = replica_report(engine.module, reader.shards)
        result["replicas_in_sync"] = in_sync
        if env.is_main:
            write_json_atomic(run_dir / "data_plan.json", {"shards_by_rank": shards_by_rank})
            final = trainer.ckpt_dir / tag_for(result["step"]) / WEIGHTS
            copy_file_atomic(final, run_dir / WEIGHTS)
            write_json_atomic(run_dir / "train.json", result)
            write_status(run_dir, "finished", result["step"])
        return result
    finally:
        if trainer and trainer.bar:
            trainer.bar.close()
        for sink in trainer.sinks if trainer else []:
            sink.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train_loop(t: Trainer, start_step: int) -> dict:
    """Steps from `start_step` to train.max_steps; stops early (cleanly) at train.time_limit_s."""
    cfg, engine = t.cfg, t.engine
    batches = t.reader.batches(start=start_step * t.accumulation)
    window = WindowStats()
    started = time.monotonic()
    metrics: dict[str, float] = {}
    step = start_step
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
        images_per_s = (step - start_step) * cfg.train.batch_size / max(elapsed, 1e-9)
        out_of_time = cfg.train.time_limit_s > 0 and elapsed >= cfg.train.time_limit_s
        last = step == cfg.train.max_steps or any_rank(out_of_time)
        if step % cfg.train.log_every == 0 or last:
            loss_mean, accuracy = window.reduce()
            metrics = {
                "loss": loss_mean,
                "train_accuracy": accuracy,
                "images_per_s": images_per_s,
                "lr": engine.get_lr()[0],
            }
            if cfg.data.on_error == "skip":
                metrics["data_skipped"] = sum_over_ranks(t.reader.num_skipped)
            if t.eval_reader and (step % cfg.train.eval_every == 0 or last):
                metrics.update(evaluate_on_main(t))
            for sink in t.sinks:  # only the main rank has sinks
                sink.log(step, metrics)
            for callback in t.callbacks:
                if t.env.is_main or getattr(callback, "every_rank", False):
                    callback(step, metrics, engine.module)
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
    if step == start_step:  # resumed a run that had already finished
        return _previous_result(Path(cfg.run.dir))
    return {
        "step": step,
        "loss": metrics["loss"],
        "train_accuracy": metrics["train_accuracy"],
        "images_per_s": metrics["images_per_s"],
        "run_dir": str(cfg.run.dir),
        **{k: v for k, v in metrics.items() if k.startswith("eval_")},
    }


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
    if path.exists():
        return json.loads(path.read_text())
    nan = float("nan")
    return {
        "step": 0,
        "loss": nan,
        "train_accuracy": nan,
        "images_per_s": 0.0,
        "run_dir": str(run_dir),
    }
