"""`capsdist eval`: accuracy and loss of exported weights on the evaluation split, no DeepSpeed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from capsdist.config import Config
from capsdist.data import ShardReader, build_reader, read_meta
from capsdist.data.checks import check_extra_eval_root
from capsdist.files import write_json_atomic
from capsdist.models import build_model, compute_loss, num_correct
from capsdist.track import ProgressBar
from capsdist.train.checkpoint import CheckpointError, model_differences
from capsdist.train.export import load_weights


def resolve_weights(ckpt: str) -> Path:
    """`ckpt` is a run directory (its model.safetensors) or a .safetensors file."""
    if not ckpt:
        raise CheckpointError("ckpt is not set: pass ckpt=RUN_DIR or ckpt=FILE.safetensors")
    path = Path(ckpt)
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.exists():
            hint = (
                " (training has not finished or was stopped early)"
                if (path / "checkpoints").exists()
                else ""
            )
            raise CheckpointError(f"{weights} does not exist{hint}: train to the end first")
        return weights
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_model(weights: Path, cfg: Config, device: torch.device) -> torch.nn.Module:
    """Build cfg.model and load the exported weights into it, refusing another model's."""
    state, saved_yaml = load_weights(weights)
    if saved_yaml:
        saved_model = yaml.safe_load(saved_yaml).get("model", {})
        diffs = model_differences(saved_model, cfg.model)
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
    model is put in eval mode (decoder masked by the prediction) and restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum = correct = examples = 0.0
    bar = ProgressBar(reader.batches_per_epoch, desc=desc, unit="batch")
    try:
        dtype = next(model.parameters()).dtype  # bf16 models take bf16 inputs
        for images, labels, recon_targets in reader.epoch(0):
            output = model(images.to(dtype))
            targets = images if recon_targets is None else recon_targets
            loss, _ = compute_loss(output, labels, targets, cfg.loss)
            loss_sum += float(loss) * images.shape[0]
            correct += int(num_correct(output, labels))
            examples += images.shape[0]
            bar.update(1, acc=f"{correct / examples:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    return {
        "accuracy": correct / max(examples, 1),
        "loss": loss_sum / max(examples, 1),
        "num_examples": int(examples),
        "num_errors": int(examples - correct),
    }


def build_eval_reader(
    cfg: Config, device: torch.device, root: str | Path | None = None
) -> ShardReader:
    """The whole evaluation split of data.root (or `root`), or its first eval.max_examples,
    fixed order, on `device`; centre-cropped / standardised as cfg.data asks."""
    return build_reader(
        cfg,
        cfg.data.eval_split,
        train=False,
        batch_size=cfg.eval.batch_size,
        max_examples=cfg.eval.max_examples,
        device=device,
        root=root,
    )


def run_eval(cfg: Config) -> dict:
    """Evaluate cfg.ckpt on cfg.data.eval_split, and on the same split of every
    data.extra_eval_roots folder (reported under `extra_eval`, keyed by folder name, and as
    `<name>_accuracy`); write eval.json beside the weights."""
    weights = resolve_weights(cfg.ckpt)
    read_meta(cfg.data.root)
    extra_roots = {Path(root).name: root for root in cfg.data.extra_eval_roots}
    for root in extra_roots.values():
        check_extra_eval_root(read_meta(root), root, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(weights, cfg, device)
    reader = build_eval_reader(cfg, device)
    result = {
        **evaluate(model, reader, cfg),
        "checkpoint": str(weights),
        "split": cfg.data.eval_split,
        "data_skipped": reader.num_skipped,
    }
    extra = {}
    for name, root in extra_roots.items():
        other = build_eval_reader(cfg, device, root=root)
        extra[name] = {**evaluate(model, other, cfg, desc=f"eval {name}"), "root": str(root)}
        result[f"{name}_accuracy"] = extra[name]["accuracy"]
    if extra:
        result["extra_eval"] = extra
    write_json_atomic(weights.parent / "eval.json", {**result, "config": asdict(cfg)})
    return result
