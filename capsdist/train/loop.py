"""`capsdist train`: the one training loop every launcher runs.

Setup in a fixed order (checks → dist → data → model → engine → resume → loop); the loop fits on
one screen; logger, checkpointer and process group are closed in `finally`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from capsdist.config import Config, config_to_yaml, save_config
from capsdist.config.schema import ConfigError
from capsdist.data import ShardReader, read_meta
from capsdist.dist import DistEnv, batch_layout, build_deepspeed_config
from capsdist.dist.engine import build_engine, init_process_group
from capsdist.errors import UserError
from capsdist.files import write_json_atomic
from capsdist.models import build_model
from capsdist.track import JsonlSink, ProgressBar, WandbSink
from capsdist.train.checkpoint import check_same_model, load_latest, save_checkpoint
from capsdist.train.export import export_weights
from capsdist.train.step import WindowStats, any_rank, replica_report, train_step


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf; nothing was saved from the broken state."""


def check_data_matches_model(meta: dict, cfg: Config) -> None:
    """The shards must be what the model expects; say which key disagrees."""
    root = cfg.data.root
    if meta.get("dataset") != cfg.data.dataset:
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r} but {root}/meta.json holds {meta.get('dataset')!r}"
        )
    expected = {
        "num_classes": cfg.model.num_classes,
        "num_targets": cfg.model.num_targets,
        "image_shape": list(cfg.model.image_shape),
    }
    for key, want in expected.items():
        have = meta.get(key)
        if have is not None and have != want:
            raise ConfigError(f"model.{key}={want} but {root}/meta.json has {key}={have}")


def run_training(cfg: Config) -> dict:
    """Train `cfg` to train.max_steps (or train.time_limit_s) and export the weights."""
    env = DistEnv.from_environ()
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    if not cfg.data.root:
        raise ConfigError("data.root is not set: point it at shards from `capsdist data ...`")
    meta = read_meta(cfg.data.root)
    check_data_matches_model(meta, cfg)
    check_same_model(ckpt_dir, cfg.model)  # before anything in run.dir is written
    micro_batch, accumulation = batch_layout(cfg, env.world_size)

    init_process_group(env)
    sinks, bar = [], None
    try:
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        reader = ShardReader(
            cfg.data.root,
            cfg.data.train_split,
            batch_size=micro_batch,
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.seed,
            train=True,
            shift_pixels=cfg.data.shift_pixels,
            shuffle_buffer=cfg.data.shuffle_buffer,
            num_workers=cfg.data.num_workers,
        )
        engine = build_engine(build_model(cfg.model), cfg, env)
        resumed = load_latest(engine, ckpt_dir)
        start_step = resumed[0] if resumed else 0
        if env.is_main:
            save_config(cfg, run_dir / "config.yaml")
            write_json_atomic(
                run_dir / "deepspeed_config.json", build_deepspeed_config(cfg, env.world_size)
            )
            if resumed:
                print(f"resumed from {ckpt_dir} at step {start_step}", flush=True)
            sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
            if cfg.wandb.mode != "disabled":
                sinks.append(
                    WandbSink(
                        run_dir,
                        cfg.wandb.mode,
                        cfg.wandb.project,
                        asdict(cfg),
                        "train",
                        cfg.wandb.group,
                        cfg.wandb.tags,
                    )
                )
            bar = ProgressBar(cfg.train.max_steps, initial=start_step)
        result = _loop(cfg, env, engine, reader, start_step, accumulation, sinks, bar, ckpt_dir)
        in_sync, shards_by_rank = replica_report(engine.module, reader.shards)
        result["replicas_in_sync"] = in_sync
        if env.is_main:
            write_json_atomic(run_dir / "data_plan.json", {"shards_by_rank": shards_by_rank})
            export_weights(engine.module, config_to_yaml(cfg), run_dir / "model.safetensors")
            write_json_atomic(run_dir / "train.json", result)
        return result
    finally:
        if bar:
            bar.close()
        for sink in sinks:
            sink.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _loop(cfg, env, engine, reader, start_step, accumulation, sinks, bar, ckpt_dir) -> dict:
    batches = reader.batches(start=start_step * accumulation)
    window = WindowStats()
    started = time.monotonic()
    loss = accuracy = float("nan")
    images_per_s = 0.0
    step = start_step

    def checkpoint(at_step: int) -> None:
        save_checkpoint(
            engine, ckpt_dir, at_step, {"step": at_step}, cfg.model, env, cfg.train.keep_last
        )

    while step < cfg.train.max_steps:
        for _ in range(accumulation):
            images, labels = next(batches)
            micro_loss, correct = train_step(engine, images, labels, cfg.loss)
            window.add(micro_loss, correct, images.shape[0])
        step += 1
        if any_rank(not math.isfinite(float(micro_loss))):
            raise NonFiniteLossError(
                f"loss is {float(micro_loss)} at step {step}; the last good checkpoint in "
                f"{ckpt_dir} is kept: lower train.lr or use ds.precision=fp32/bf16, then rerun"
            )
        elapsed = time.monotonic() - started
        images_per_s = (step - start_step) * cfg.train.batch_size / max(elapsed, 1e-9)
        out_of_time = cfg.train.time_limit_s > 0 and elapsed >= cfg.train.time_limit_s
        last = step == cfg.train.max_steps or any_rank(out_of_time)
        if step % cfg.train.log_every == 0 or last:
            loss, accuracy = window.reduce()
            metrics = {
                "loss": loss,
                "train_accuracy": accuracy,
                "images_per_s": images_per_s,
                "lr": engine.get_lr()[0],
            }
            for sink in sinks:
                sink.log(step, metrics)
        if bar:
            bar.update(
                1,
                loss=f"{float(micro_loss):.4f}",
                acc=f"{accuracy:.3f}",
                img_s=f"{images_per_s:.0f}",
            )
        if last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
            checkpoint(step)
        if last:
            break
    if step == start_step:  # resumed a run that had already finished
        loss, accuracy = _previous_result(Path(cfg.run.dir))
    return {
        "step": step,
        "loss": loss,
        "train_accuracy": accuracy,
        "images_per_s": images_per_s,
        "run_dir": str(cfg.run.dir),
    }


def _previous_result(run_dir: Path) -> tuple[float, float]:
    path = run_dir / "train.json"
    if not path.exists():
        return float("nan"), float("nan")
    previous = json.loads(path.read_text())
    return previous["loss"], previous["train_accuracy"]
