"""Warm start (`train.init_from`): a new run begins from exported weights (a model.safetensors,
or a run directory's) with a fresh optimizer at step 0, e.g. MNIST weights fine-tuned on
Fashion-MNIST. Strict by default: every tensor of the model must be in the file with its shape;
`train.init_strict=false` loads those that match and names the rest (they keep their fresh
initialisation), e.g. the class capsules after a change of model.num_classes."""

from __future__ import annotations

import torch

from capsdist.config import Config
from capsdist.run_dir import (
    CheckpointError,
    load_weights,
    model_differences,
    resolve_weights,
    saved_model_config,
)


class WarmStartError(CheckpointError):
    """train.init_from does not fit the model; the message lists what does not."""


def init_weights(cfg: Config, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of train.init_from to load into `model` (built from cfg.model), and the log
    line saying where they come from and what was skipped. Checked before the engine is built,
    so a mismatch fails in seconds."""
    path = resolve_weights(cfg.train.init_from)
    weights, config_yaml = load_weights(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshapen = [
        f"{k} {tuple(weights[k].shape)} there, {shape} here"
        for k, shape in expected.items()
        if k in weights and tuple(weights[k].shape) != shape
    ]
    matching = {k: v for k, v in weights.items() if k in expected and tuple(v.shape) == expected[k]}
    problems = _listed(missing, unexpected, misshapen)
    if problems and cfg.train.init_strict:
        diffs = model_differences(saved_model_config(config_yaml), cfg.model)
        because = f" (its model: {'; '.join(diffs[:3])})" if diffs else ""
        raise WarmStartError(
            f"train.init_from={cfg.train.init_from}: {path} does not fit this model{because}: "
            f"{problems}; set train.init_strict=false to load the {len(matching)} tensors "
            "that match and keep the rest freshly initialised"
        )
    note = f"warm start from {path}: {len(matching)} of {len(expected)} tensors loaded"
    return matching, note + (f"; skipped {problems}" if problems else "")


def _listed(missing: list[str], unexpected: list[str], misshapen: list[str]) -> str:
    parts = [
        f"{label} {', '.join(names[:6])}{' …' if len(names) > 6 else ''}"
        for label, names in (
            ("not in the file:", missing),
            ("not in the model:", unexpected),
            ("other shape:", misshapen),
        )
        if names
    ]
    return "; ".join(parts)
