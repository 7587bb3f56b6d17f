"""Exported fp32 weights + config as safetensors: what `eval` loads without DeepSpeed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

CONFIG_KEY = "capsdist_config"


def export_weights(state: dict[str, torch.Tensor], config_yaml: str, path: Path) -> None:
    """Write a state dict as fp32 safetensors with the resolved config in the metadata,
    atomically (a crash leaves the previous export in place)."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: config_yaml})
    os.replace(tmp, path)


def copy_weights(src: Path, dst: Path) -> None:
    """Copy an exported file atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, config YAML) of an exported model; no pickle involved."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata.get(CONFIG_KEY, "")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
