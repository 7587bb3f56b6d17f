"""The model as `predict` and `export` run it: its config read from the weights themselves, and
one module that takes images (N, C, H, W) in [0, 1] and does what evaluation does after that.

Weights carry the resolved config of their run in their safetensors metadata (run_dir.py), so
`capsdist predict ckpt=RUN` needs no -c: the architecture, the input shape and the data set's
photometric step (per-image standardisation for CIFAR-10 / smallNORB) all come from there.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from capsdist.config import Config, ConfigError, load_config
from capsdist.data import DataError, read_meta
from capsdist.data.augment import standardize
from capsdist.eval import load_model
from capsdist.run_dir import CheckpointError, load_weights, resolve_weights


def load_serving_config(yaml_paths: Sequence[str], overrides: Sequence[str]) -> tuple[Config, Path]:
    """(config, weights file) for `ckpt=...` among `overrides`: the config saved in the weights
    < each -c YAML < the key=value overrides. Weights without a saved config need -c."""
    cfg = load_config(yaml_paths, overrides)  # to find ckpt, and check the keys early
    weights = resolve_weights(cfg.ckpt)
    _, saved_yaml = load_weights(weights)
    if not saved_yaml:
        if not yaml_paths:
            raise CheckpointError(
                f"{weights} holds no config (written by an older capsdist): pass -c CONFIG, "
                "the config that trained it"
            )
        return cfg, weights
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="saved-config-") as saved:
        saved.write(saved_yaml)
        saved.flush()
        try:
            cfg = load_config([saved.name, *yaml_paths], overrides)
        except ConfigError as err:
            # Name the weights, not the temporary file: a key this capsdist does not know.
            raise ConfigError(
                str(err).replace(saved.name, f"the config saved in {weights}")
            ) from err
    return cfg, weights


def portable(cfg: Config) -> Config:
    """A copy of cfg whose model runs on torch ops only: the fused C++ routing passes and
    torch.compile are runtime switches (same weights, same results) that tracing cannot follow
    (torch.export fails on the fused passes' outputs: "The tensor has a non-zero number of
    elements, but its data is not allocated yet")."""
    out = copy.deepcopy(cfg)
    out.model.fused_routing = False
    out.model.compile = False
    out.model.channels_last = False
    return out


class ServingModel(nn.Module):
    """images (N, C, H, W) float in [0, 1] → `lengths` (N, J) [, `reconstruction`]: the trained
    model with the evaluation's photometric step in front (per-image standardisation when the
    data set was standardised), so an exported graph needs nothing but pixels / 255. Without
    labels, the decoder is masked by the predicted class(es), as the model does."""

    def __init__(self, model: nn.Module, standardize_images: bool):
        super().__init__()
        self.model = model
        self.standardize_images = standardize_images

    @property
    def has_decoder(self) -> bool:
        return getattr(self.model, "decoder", None) is not None

    def output_names(self) -> list[str]:
        return ["lengths", "reconstruction"] if self.has_decoder else ["lengths"]

    def forward(self, images: torch.Tensor):
        x = standardize(images) if self.standardize_images else images
        out = self.model(x)
        if out.reconstruction is None:
            return out.lengths
        return out.lengths, out.reconstruction


def build_serving_model(weights: Path, cfg: Config, device: torch.device) -> ServingModel:
    """The exported weights loaded as eval loads them (refusing another architecture), wrapped."""
    return ServingModel(load_model(weights, cfg, device), cfg.data.standardize).eval()


def class_scores(lengths: torch.Tensor, cfg: Config) -> torch.Tensor:
    """(N, J) scores in [0, 1] per class: a CapsNet's capsule lengths are already the
    probability that the class is present (Sabour et al. 2017, section 2); a CNN baseline's
    logits go through what its loss used (softmax for one target, sigmoid for two)."""
    if cfg.loss.name == "softmax":
        return F.softmax(lengths.float(), dim=-1)
    if cfg.loss.name == "sigmoid":
        return torch.sigmoid(lengths.float())
    return lengths.float()


def data_image_shape(cfg: Config, warn: bool = True) -> tuple[list[int], dict | None]:
    """([H, W, C] of the data set's shards, their meta.json or None). Shards may be larger than
    the model's input (CIFAR-10 32x32 for a 24x24 model: evaluation centre-crops them), which
    only meta.json tells; when data.root is unset or unreadable, the model's own shape, with a
    warning."""
    want = list(cfg.model.image_shape)
    if not cfg.data.root:
        return want, None
    try:
        meta = read_meta(cfg.data.root)
    except DataError as err:
        if warn:
            print(
                f"warning: data.root not read ({err}); images are taken at the model's size "
                f"{want[0]}x{want[1]} (set data.root to the training data to crop as eval does)",
                file=sys.stderr,
            )
        return want, None
    return list(meta["image_shape"]), meta
