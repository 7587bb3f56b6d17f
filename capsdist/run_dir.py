"""The run directory: its format, written by training and read by eval, validate, ensembles and
figures. The one module that knows the file names, the checkpoint marker and the "same model?" rule.

    run.dir/
      config.yaml            resolved config of the run
      status.json            running | finished, with the step (validate stops after finished)
      model.safetensors      exported fp32 weights + config YAML in the metadata (eval reads this)
      train.json, eval.json  the results of `capsdist train` / `capsdist eval`
      checkpoints/stepNNNNNNNNN/   DeepSpeed's files, model.safetensors (consolidated fp32) and
                                   capsdist.json, written LAST: the checkpoint is complete
      checkpoints/latest     the newest complete tag, replaced atomically

Every file is written atomically (temp file + rename): a crash mid-write leaves the old file,
never half a new one. Weights are read from safetensors only (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from capsdist.config import Config, ModelConfig, config_to_yaml
from capsdist.errors import UserError

CONFIG = "config.yaml"
STATUS = "status.json"
WEIGHTS = "model.safetensors"  # in run.dir (final) and in every checkpoint folder
CHECKPOINTS = "checkpoints"
MARKER = "capsdist.json"  # in a checkpoint folder: written last, marks it complete
LATEST = "latest"
CONFIG_KEY = "capsdist_config"  # safetensors metadata key holding the config YAML

# How the model runs, not what it is: weights move freely between these settings.
RUNTIME_MODEL_KEYS = ("compile", "channels_last", "fused_routing")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, damaged or belongs to another model; the message names it."""


# ---- atomic writes ------------------------------------------------------------------------------


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = _tmp_beside(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_file_atomic(src: Path, dst: Path) -> None:
    tmp = _tmp_beside(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_config(run_dir: Path, cfg: Config) -> None:
    """run.dir/config.yaml: the resolved config."""
    write_text_atomic(run_dir / CONFIG, config_to_yaml(cfg))


# ---- exported weights (safetensors) -------------------------------------------------------------


def export_weights(state: dict[str, torch.Tensor], config_yaml: str, path: Path) -> None:
    """Write a state dict as fp32 safetensors with the resolved config in the metadata."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    tmp = _tmp_beside(path)
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: config_yaml})
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, config YAML) of exported weights; no pickle involved."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata.get(CONFIG_KEY, "")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err


def saved_model_config(config_yaml: str) -> dict:
    """The `model` section of a config YAML stored with weights ({} if none was stored)."""
    return (yaml.safe_load(config_yaml or "{}") or {}).get("model", {})


def resolve_weights(ckpt: str) -> Path:
    """`ckpt` is a run directory (its model.safetensors) or a .safetensors file."""
    if not ckpt:
        raise CheckpointError("ckpt is not set: pass ckpt=RUN_DIR or ckpt=FILE.safetensors")
    path = Path(ckpt)
    if path.is_dir():
        weights = path / WEIGHTS
        if not weights.exists():
            hint = (
                " (training has not finished or was stopped early)"
                if (path / CHECKPOINTS).exists()
                else ""
            )
            raise CheckpointError(f"{weights} does not exist{hint}: train to the end first")
        return weights
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


# ---- "same model?" ------------------------------------------------------------------------------


def model_differences(saved: dict, current: ModelConfig | dict) -> list[str]:
    """The architecture settings in which a saved `model` config (a dict) and `current` differ,
    runtime switches (RUNTIME_MODEL_KEYS) aside. A key the saved config lacks (written by an
    older capsdist) counts as that key's default."""
    defaults = asdict(ModelConfig())
    now = current if isinstance(current, dict) else asdict(current)
    return [
        f"model.{k}: {saved.get(k, defaults[k])!r} there, {now.get(k, defaults[k])!r} here"
        for k in defaults
        if k not in RUNTIME_MODEL_KEYS and saved.get(k, defaults[k]) != now.get(k, defaults[k])
    ]


# ---- checkpoints --------------------------------------------------------------------------------


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint whose marker was written, oldest first."""
    found = []
    for marker in ckpt_dir.glob(f"step*/{MARKER}"):
        try:
            found.append((int(json.loads(marker.read_text())["step"]), marker.parent))
        except (ValueError, KeyError, json.JSONDecodeError):
            warnings.warn(f"ignoring checkpoint {marker.parent}: unreadable {MARKER}", stacklevel=2)
    return sorted(found)


def mark_complete(folder: Path, step: int, cfg: Config, keep_last: int) -> None:
    """After every file of a checkpoint is written: its marker, then `latest`, then prune all
    but the newest `keep_last` complete checkpoints."""
    write_json_atomic(folder / MARKER, {"step": step, "model": asdict(cfg.model)})
    write_text_atomic(folder.parent / LATEST, folder.name)
    for _, old in complete_checkpoints(folder.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def check_same_model(ckpt_dir: Path, model_cfg: ModelConfig) -> None:
    """Refuse to resume (or overwrite) a run directory that holds another model's checkpoints."""
    checkpoints = complete_checkpoints(ckpt_dir)
    if not checkpoints:
        return
    saved = json.loads((checkpoints[-1][1] / MARKER).read_text())["model"]
    diffs = model_differences(saved, model_cfg)
    if diffs:
        raise CheckpointError(
            f"{ckpt_dir} holds a checkpoint of a different model ({'; '.join(diffs[:3])}): "
            "use another run.dir, or the same model settings to resume"
        )


# ---- status -------------------------------------------------------------------------------------


def write_status(run_dir: Path, state: str, step: int) -> None:
    """run.dir/status.json: `running` or `finished`; `capsdist validate` stops after finished."""
    write_json_atomic(run_dir / STATUS, {"state": state, "step": step, "time": time.time()})


def training_finished(run_dir: Path) -> bool:
    status = run_dir / STATUS
    return status.exists() and json.loads(status.read_text()).get("state") == "finished"
