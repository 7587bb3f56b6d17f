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

from capsdist.config import Config, config_to_yaml, save_config
from capsdist.config.schema import ConfigError
from capsdist.data import ShardReader, read_meta
from capsdist.data.build import build_reader
from capsdist.data.checks import check_data_matches_model
from capsdist.dist import DistEnv, batch_layout, build_deepspeed_config
from capsdist.dist.engine import build_engine, device_for, init_process_group
from capsdist.errors import UserError
from capsdist.eval.evaluate import build_eval_reader, evaluate
from capsdist.files import write_json_atomic
from capsdist.memory import keep_freed_memory
from capsdist.models import build_model
from capsdist.track import JsonlSink, MetricSink, ProgressBar, WandbSink
from capsdist.train.checkpoint import (
    WEIGHTS,
    check_same_model,
    load_latest,
    save_checkpoint,
    tag_for,
)
from capsdist.train.export import copy_weights
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
        return Path(self.cfg.run.dir) / "checkpoints"


def run_training(cfg: Config, callbacks: Sequence[Callback] = ()) -> dict:
    """Train `cfg` to train.max_steps (or train.time_limit_s) and export the weights."""
    keep_freed_memory()  # before the first large allocation
    env = DistEnv.from_environ()
    run_dir = Path(cfg.run.dir)
    if not cfg.data.root:
        raise ConfigError("data.root is not set: point it at shards from `capsdist data ...`")
    check_data_matches_model(read_meta(cfg.data.root), cfg)
    check_same_model(run_dir / "checkpoints", cfg.model)  # before anything in run.dir is written
    micro_batch, accumulation = batch_layout(cfg, env.world_size)

    init_process_group(env)
    trainer = None
    try:
        device = device_for(env)
        reader = build_reader(
            cfg,
            cfg.data.train_split,
            train=True,
            batch_size=micro_batch,
            rank=env.rank,
            world_size=env.world_size,
            device=device,
        )
        eval_reader = build_eval_reader(cfg, device) if cfg.train.eval_every else None
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        engine = build_engine(build_model(cfg.model), cfg, env)
        resumed = load_latest(engine, run_dir / "checkpoints")
        start_step = resumed[0] if resumed else 0
        trainer = Trainer(cfg, env, engine, reader, eval_reader, accumulation, callbacks=callbacks)
        if env.is_main:
            print(config_to_yaml(cfg), file=sys.stderr, flush=True)  # the resolved config, once
            save_config(cfg, run_dir / "config.yaml")
            ds_config = build_deepspeed_config(cfg, env.world_size)
            write_json_atomic(run_dir / "deepspeed_config.json", ds_config)
            if resumed:
                print(f"resumed from {trainer.ckpt_dir} at step {start_step}", flush=True)
            write_status(run_dir, "running", start_step)
            trainer.sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
            if cfg.wandb.mode != "disabled":
                config_dict = {**asdict(cfg), "deepspeed": ds_config}
                trainer.sinks.append(WandbSink(run_dir, cfg.wandb, config_dict, job_type="train"))
            trainer.bar = ProgressBar(cfg.train.max_steps, initial=start_step)
        result = train_loop(trainer, start_step)
        in_sync, shards_by_rank = replica_report(engine.module, reader.shards)
        result["replicas_in_sync"] = in_sync
        if env.is_main:
            write_json_atomic(run_dir / "data_plan.json", {"shards_by_rank": shards_by_rank})
            final = trainer.ckpt_dir / tag_for(result["step"]) / WEIGHTS
            copy_weights(final, run_dir / "model.safetensors")
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


def write_status(run_dir: Path, state: str, step: int) -> None:
    """run.dir/status.json: `running` or `finished`; `capsdist validate` stops after finished."""
    write_json_atomic(run_dir / "status.json", {"state": state, "step": step, "time": time.time()})


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
