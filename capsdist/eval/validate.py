"""`capsdist validate`: follow a training run and evaluate each new checkpoint once.

The reference's `--validate` job: poll the run's checkpoint folder, evaluate every complete
checkpoint on the evaluation split, keep the best, and stop when training has ended (its
status.json says finished, stopped or failed) or when no new checkpoint came for
validate.timeout_s. It reads only the
consolidated safetensors each checkpoint holds, so it needs no DeepSpeed and can run on another
machine that sees the run directory. A restarted validator skips what it already evaluated.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from capsdist.config import Config, config_to_dict
from capsdist.data import read_meta
from capsdist.distributed import pick_device
from capsdist.eval.evaluate import build_eval_reader, evaluate, load_model
from capsdist.run_dir import (
    CHECKPOINTS,
    ENDED,
    WEIGHTS,
    CheckpointError,
    UnreadableWeightsError,
    complete_checkpoints,
    copy_file_atomic,
    read_status,
    write_json_atomic,
)
from capsdist.track import JsonlSink, build_wandb_sink, log_model_artifact

BEST = "best.safetensors"  # in run.dir: the weights of the best checkpoint so far


def run_validate(cfg: Config) -> dict:
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / CHECKPOINTS
    if not run_dir.is_dir():
        raise CheckpointError(f"run.dir {run_dir} does not exist: start training there first")
    device = pick_device()
    reader = build_eval_reader(cfg, read_meta(cfg.data.root), device)
    record_path = run_dir / "validation.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"evaluated": {}}
    sinks = [JsonlSink(run_dir / "metrics.jsonl")]
    wandb = build_wandb_sink(run_dir, cfg.wandb, config_to_dict(cfg), job_type="validate")
    sinks += [wandb] if wandb else []
    last_new = time.monotonic()
    try:
        while True:
            status = read_status(run_dir)  # read BEFORE listing: no final ckpt missed
            pending = [
                (step, folder)
                for step, folder in complete_checkpoints(ckpt_dir)
                if str(step) not in record["evaluated"]
            ]
            for step, folder in pending:
                scores = _evaluate_checkpoint(folder, cfg, device, reader, step)
                if scores is None:
                    continue
                record["evaluated"][str(step)] = scores
                if scores["accuracy"] > record.get("best_accuracy", -1.0):
                    copy_file_atomic(folder / WEIGHTS, run_dir / BEST)
                    record.update(best_step=step, best_accuracy=scores["accuracy"])
                write_json_atomic(record_path, record)
                metrics = {
                    "val_accuracy": scores["accuracy"],
                    "val_loss": scores["loss"],
                    "val_best_accuracy": record["best_accuracy"],
                }
                for sink in sinks:
                    sink.log(step, metrics)
                last_new = time.monotonic()
            if status.get("state") in ENDED:  # read before the listing: nothing can follow it
                break
            if time.monotonic() - last_new > cfg.validate.timeout_s:
                waited = cfg.validate.timeout_s
                warnings.warn(f"no new checkpoint in {ckpt_dir} for {waited:.0f} s", stacklevel=1)
                break
            time.sleep(cfg.validate.poll_s)
        _log_best(sinks, run_dir, record, cfg)
    finally:
        for sink in sinks:
            sink.close()
    if not record["evaluated"]:
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint appeared to validate")
    return {
        "num_checkpoints": len(record["evaluated"]),
        "best_step": record["best_step"],
        "best_accuracy": record["best_accuracy"],
        "finished": status.get("state") == "finished",
        "training": status.get("state", "not started"),
        "run_dir": str(run_dir),
    }


def _log_best(sinks: list, run_dir: Path, record: dict, cfg: Config) -> None:
    """best.safetensors as a version of the run's W&B model artifact, alias `best`, once the
    run is followed to its end (an interrupted validate logs it when rerun)."""
    if "best_step" not in record:
        return
    metadata = {
        "step": record["best_step"],
        "accuracy": record["best_accuracy"],
        "split": cfg.data.eval_split,
        "config": config_to_dict(cfg),
    }
    aliases = ["best", f"step-{record['best_step']}"]
    log_model_artifact(sinks, run_dir / BEST, run_dir, aliases, metadata)


def _evaluate_checkpoint(folder: Path, cfg: Config, device, reader, step: int) -> dict | None:
    """Scores of one checkpoint, or None if training pruned it before we read it (or it is
    damaged: following a run, the next checkpoint is as good)."""
    try:
        model = load_model(folder / WEIGHTS, cfg, device)
    except UnreadableWeightsError as err:
        warnings.warn(f"skipping checkpoint {folder}: {err}", stacklevel=2)
        return None
    return evaluate(model, reader, cfg, desc=f"validate step {step}")
