"""`capsdist eval`: accuracy and loss of exported weights on the evaluation split, no DeepSpeed.

Also the pieces every reader of a run directory shares: the model rebuilt from exported weights
(`load_model`) and the evaluation reader.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from capsdist.config import Config, config_to_dict
from capsdist.data import DataError, ShardReader, build_reader, check_extra_eval_root, read_meta
from capsdist.distributed import pick_device
from capsdist.models import build_model, compute_loss, num_correct
from capsdist.run_dir import (
    CheckpointError,
    load_weights,
    model_differences,
    resolve_weights,
    saved_model_config,
    write_json_atomic,
)
from capsdist.track import ProgressBar, build_wandb_sink


def load_model(weights: Path, cfg: Config, device: torch.device) -> torch.nn.Module:
    """Build cfg.model and load the exported weights into it, refusing another model's."""
    state, saved_yaml = load_weights(weights)
    diffs = model_differences(saved_model_config(saved_yaml), cfg.model) if saved_yaml else []
    if diffs:
        raise CheckpointError(f"{weights} holds a different model ({'; '.join(diffs[:3])})")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit model.name={cfg.model.name}: {err}") from err
    return model.to(device).eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, reader: ShardReader, cfg: Config, desc: str = "eval") -> dict:
    """Loss and accuracy (top-T classes = the T true classes) over the reader's split. The
    model is put in eval mode and restored afterwards. As in the reference, the decoder is masked
    by the TRUE labels here too (the reference's eval loss; slot t reconstructs target t), so
    the loss is comparable with training's; figures mask by the prediction instead."""
    was_training = model.training
    model.eval()
    loss_sum = correct = examples = 0.0
    bar = ProgressBar(reader.batches_per_epoch, desc=desc, unit="batch")
    try:
        dtype = next(model.parameters()).dtype  # bf16 models take bf16 inputs
        for images, labels, recon_targets in reader.epoch(0):
            output = model(images.to(dtype), labels)
            targets = images if recon_targets is None else recon_targets
            loss, _ = compute_loss(output, labels, targets, cfg.loss)
            loss_sum += float(loss) * images.shape[0]
            correct += int(num_correct(output, labels))
            examples += images.shape[0]
            bar.update(1, acc=f"{correct / examples:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    if not examples:
        raise no_examples_error(reader)
    return {
        "accuracy": correct / examples,
        "loss": loss_sum / examples,
        "num_examples": int(examples),
        "num_errors": int(examples - correct),
    }


def no_examples_error(reader: ShardReader) -> DataError:
    """An evaluation that read nothing has no score: 0 % accuracy would be a lie."""
    skipped = f" ({reader.num_skipped} bad, skipped under data.on_error=skip)"
    return DataError(
        f"{reader.root}: no {reader.split!r} example to evaluate"
        f"{skipped if reader.num_skipped else ''}: check the data or data.eval_split"
    )


def build_eval_reader(
    cfg: Config,
    meta: dict,
    device: torch.device,
    root: str | Path | None = None,
    max_examples: int | None = None,
) -> ShardReader:
    """The whole evaluation split of data.root (or `root`, whose meta.json `meta` is), or its
    first `max_examples` (default eval.max_examples), fixed order, on `device`; centre-cropped /
    standardised as cfg.data asks."""
    return build_reader(
        cfg,
        cfg.data.eval_split,
        meta,
        train=False,
        batch_size=cfg.eval.batch_size,
        max_examples=cfg.eval.max_examples if max_examples is None else max_examples,
        device=device,
        root=root,
    )


def run_eval(cfg: Config) -> dict:
    """Evaluate cfg.ckpt on cfg.data.eval_split, and on the same split of every
    data.extra_eval_roots folder (reported under `extra_eval`, keyed by folder name, and as
    `<name>_accuracy`); write eval.json beside the weights."""
    weights = resolve_weights(cfg.ckpt)
    meta = read_meta(cfg.data.root)
    extra_metas = {root: read_meta(root) for root in cfg.data.extra_eval_roots}
    for root, extra_meta in extra_metas.items():
        check_extra_eval_root(extra_meta, root, cfg)
    device = pick_device()
    model = load_model(weights, cfg, device)
    reader = build_eval_reader(cfg, meta, device)
    result = {
        **evaluate(model, reader, cfg),
        "checkpoint": str(weights),
        "split": cfg.data.eval_split,
        "data_skipped": reader.num_skipped,
    }
    extra = {}
    for root, extra_meta in extra_metas.items():
        name = str(root).rstrip("/").rsplit("/", 1)[-1]  # the folder's name, of a path or URL
        other = build_eval_reader(cfg, extra_meta, device, root=root)
        extra[name] = {**evaluate(model, other, cfg, desc=f"eval {name}"), "root": str(root)}
        result[f"{name}_accuracy"] = extra[name]["accuracy"]
    if extra:
        result["extra_eval"] = extra
    _write_eval_json(weights.parent / "eval.json", {**result, "config": config_to_dict(cfg)})
    log_eval_to_wandb(cfg, weights.parent, result)
    return result


def log_eval_to_wandb(cfg: Config, where: Path, result: dict, table: tuple = ()) -> None:
    """A W&B run of job_type `eval` in `where` (wandb.mode=disabled: none) holding `result` as
    its summary, and `table` ((key, columns, rows)) if given. Scores of weights in a read-only
    place still reach stdout: W&B is skipped there, with a warning."""
    try:
        sink = build_wandb_sink(where, cfg.wandb, config_to_dict(cfg), job_type="eval")
    except OSError as err:
        print(f"warning: no W&B run for this evaluation ({where}: {err})", file=sys.stderr)
        return
    if sink is None:
        return
    try:
        if table:
            sink.log_table(*table)
        sink.summary(result)
    finally:
        sink.close()


def _write_eval_json(path: Path, record: dict) -> None:
    """eval.json beside the weights. Weights in a read-only place (a colleague's run, an
    archive) are still worth evaluating: their score goes to stdout, and a warning says so."""
    try:
        write_json_atomic(path, record)
    except OSError as err:
        print(
            f"warning: {path} not written ({err.strerror}); the result is on stdout only",
            file=sys.stderr,
        )
