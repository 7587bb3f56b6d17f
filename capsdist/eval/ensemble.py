"""`capsdist ensemble-eval`: evaluate N exported models and their ensemble in one data pass.

As the reference's `evaluate_ensemble` (experiment.py): the members' class lengths are SUMMED
and the ensemble predicts the argmax (the top two for two targets, scored like one model). Unlike
the reference, which silently skips checkpoints that are missing, every member must exist and
all must be the same architecture, or nothing is evaluated.
"""

from __future__ import annotations

import glob
import os
from itertools import combinations
from pathlib import Path

import torch

from capsdist.config import Config, config_to_dict
from capsdist.data import read_meta
from capsdist.distributed import pick_device
from capsdist.eval.evaluate import (
    build_eval_reader,
    load_model,
    log_eval_to_wandb,
    no_examples_error,
)
from capsdist.models import ModelOutput, num_correct
from capsdist.run_dir import (
    WEIGHTS,
    CheckpointError,
    load_weights,
    model_differences,
    resolve_weights,
    saved_model_config,
    write_json_atomic,
    write_text_atomic,
)
from capsdist.track import ProgressBar


def resolve_members(checkpoints: list[str], num_trials: int = 0) -> list[Path]:
    """Weight files of the members. Each item is a run dir, a .safetensors file, a pattern
    with `{}` (formatted with 0..num_trials-1, as the reference) or a glob (`runs/ens/*`)."""
    found: list[str] = []
    for item in checkpoints:
        if "{}" in item:
            if num_trials < 1:
                raise CheckpointError(f"--checkpoints {item!r} has {{}}: pass --num-trials N")
            found += [item.format(i) for i in range(num_trials)]
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise CheckpointError(f"--checkpoints {item!r} matches nothing")
            found += matches
        else:
            found.append(item)
    missing = [p for p in found if not (Path(p).is_file() or (Path(p) / WEIGHTS).is_file())]
    if missing:
        raise CheckpointError(
            f"ensemble member(s) without exported weights: {', '.join(missing)} "
            f"({len(found) - len(missing)} of {len(found)} found; train them to the end first)"
        )
    if num_trials and len(found) < num_trials:
        raise CheckpointError(
            f"--checkpoints {' '.join(checkpoints)} gives {len(found)} member(s), fewer than "
            f"--num-trials {num_trials}"
        )
    if len(found) < 2:
        raise CheckpointError(f"an ensemble needs at least 2 members, got {len(found)}")
    weights = [resolve_weights(p) for p in found]
    if len(set(weights)) < len(weights):
        raise CheckpointError("--checkpoints names the same weights more than once")
    return weights


def check_same_architecture(weights: list[Path]) -> dict:
    """The members' exported `model` configs must agree (by the run directory's one rule:
    runtime switches such as model.compile aside); returns the first (empty if not recorded)."""
    models = [saved_model_config(load_weights(w)[1]) for w in weights]
    first = models[0]
    for path, model in zip(weights[1:], models[1:], strict=True):
        diffs = model_differences(model, first)
        if diffs:
            raise CheckpointError(
                f"ensemble members have different architectures: {path} and {weights[0]} "
                f"differ in {'; '.join(diffs[:3])}"
            )
    return first


@torch.no_grad()
def evaluate_ensemble(
    members: list[torch.nn.Module], reader, num_targets: int, desc: str = "ensemble"
) -> dict:
    """One pass over the reader: every batch is read once and given to every member.

    Returns each member's accuracy, the ensemble's (summed class lengths), the fraction of
    examples on which all members predict the same, and the mean pairwise agreement.
    """
    n = len(members)
    correct = torch.zeros(n, dtype=torch.long)
    ensemble_correct = all_agree = examples = 0
    pair_agree = torch.zeros(n, n, dtype=torch.long)
    bar = ProgressBar(reader.batches_per_epoch, desc=desc, unit="batch")
    try:
        for batch in reader.epoch(0):
            images, labels = batch.images, batch.labels
            lengths = [m(images).lengths.float() for m in members]  # n × (B, J)
            preds = [ModelOutput(lengths=x).predictions(num_targets) for x in lengths]
            for i, x in enumerate(lengths):
                correct[i] += int(num_correct(ModelOutput(lengths=x), labels))
            summed = ModelOutput(lengths=torch.stack(lengths).sum(0))  # the reference's combine
            ensemble_correct += int(num_correct(summed, labels))
            same = [
                (a == b).view(a.shape[0], -1).all(1) for a, b in zip(preds, preds[1:], strict=False)
            ]
            all_agree += int(torch.stack(same).all(0).sum())
            for i, j in combinations(range(n), 2):
                pair_agree[i, j] += int((preds[i] == preds[j]).view(len(images), -1).all(1).sum())
            examples += images.shape[0]
            bar.update(1, acc=f"{ensemble_correct / examples:.4f}")
    finally:
        bar.close()
    if not examples:
        raise no_examples_error(reader)
    pairs = max(n * (n - 1) // 2, 1)
    return {
        "member_accuracies": [int(c) / examples for c in correct],
        "ensemble_accuracy": ensemble_correct / examples,
        "agreement_all": all_agree / examples,
        "agreement_pairwise": int(pair_agree.sum()) / pairs / examples,
        "num_examples": examples,
    }


def markdown_table(result: dict, names: list[str]) -> str:
    lines = ["| model | accuracy | error % |", "| --- | --- | --- |"]
    for name, acc in zip(names, result["member_accuracies"], strict=True):
        lines.append(f"| {name} | {acc:.4f} | {100 * (1 - acc):.2f} |")
    acc = result["ensemble_accuracy"]
    lines.append(f"| **ensemble of {len(names)}** | **{acc:.4f}** | **{100 * (1 - acc):.2f}** |")
    lines.append("")
    lines.append(
        f"Members agree on {100 * result['agreement_all']:.2f} % of the "
        f"{result['num_examples']} examples (pairwise: {100 * result['agreement_pairwise']:.2f} %)."
    )
    return "\n".join(lines) + "\n"


def run_ensemble_eval(
    cfg: Config, checkpoints: list[str], num_trials: int = 0, out: str = ""
) -> dict:
    """Evaluate the members and their ensemble on cfg.data.eval_split; write the table."""
    weights = resolve_members(checkpoints, num_trials)
    check_same_architecture(weights)
    meta = read_meta(cfg.data.root)
    device = pick_device()
    members = [load_model(w, cfg, device) for w in weights]
    reader = build_eval_reader(cfg, meta, device)
    result = evaluate_ensemble(members, reader, cfg.model.num_targets)
    names = [str(w.parent if w.name == WEIGHTS else w) for w in weights]
    out_dir = Path(out) if out else Path(os.path.commonpath([Path(n) for n in names])) / "ensemble"
    table = markdown_table(result, names)
    print(table, end="", flush=True)
    result.update(members=names, split=cfg.data.eval_split, out=str(out_dir))
    write_text_atomic(out_dir / "ensemble.md", table)
    write_json_atomic(out_dir / "ensemble.json", {**result, "config": config_to_dict(cfg)})
    _log_to_wandb(cfg, out_dir, result)
    return result


def _log_to_wandb(cfg: Config, out_dir: Path, result: dict) -> None:
    """An `eval` run tagged `ensemble` whose table lists every member and the ensemble."""
    cfg.wandb.group = cfg.wandb.group or f"ensemble-{out_dir.parent.name}"
    cfg.wandb.tags = [*cfg.wandb.tags, "ensemble"]
    rows = [[m, a] for m, a in zip(result["members"], result["member_accuracies"], strict=True)]
    rows.append([f"ensemble of {len(rows)}", result["ensemble_accuracy"]])
    summary = {k: v for k, v in result.items() if k not in ("members", "member_accuracies")}
    table = ("ensemble/accuracy", ["model", "accuracy"], rows)
    log_eval_to_wandb(cfg, out_dir, summary, table)
