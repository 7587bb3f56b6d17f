"""DeepSpeed checkpoints in run.dir/checkpoints; a crash never loses the last good one.

Layout: checkpoints/step000001500/ (DeepSpeed's files, model.safetensors with the consolidated
fp32 weights, and capsdist.json, written LAST, which marks the checkpoint complete) and
checkpoints/latest (the newest complete tag, replaced atomically). DeepSpeed reads its own files
with pickle (weights_only=False): resume only from run directories you wrote yourself; `eval`
and `validate` read the safetensors files only.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from capsdist.config import Config, config_to_yaml
from capsdist.config.schema import ModelConfig
from capsdist.dist.env import DistEnv
from capsdist.errors import UserError
from capsdist.files import write_json_atomic, write_text_atomic
from capsdist.train.export import export_weights

MARKER = "capsdist.json"
WEIGHTS = "model.safetensors"  # consolidated fp32 weights of the checkpoint, for eval/validate


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, damaged or belongs to another model; the message names it."""


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


# How the model runs, not what it is: checkpoints move freely between these settings.
RUNTIME_MODEL_KEYS = ("compile", "channels_last")


def model_differences(saved: dict, current: ModelConfig) -> list[str]:
    """The model settings in which a saved config (a dict) and `current` differ. A key the saved
    config lacks (written by an older capsdist) counts as that key's default."""
    defaults, now = asdict(ModelConfig()), asdict(current)
    return [
        f"model.{k}: {saved.get(k, defaults[k])!r} there, {now[k]!r} here"
        for k in now
        if k not in RUNTIME_MODEL_KEYS and saved.get(k, defaults[k]) != now[k]
    ]


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


def save_checkpoint(engine, ckpt_dir: Path, step: int, cfg: Config, env: DistEnv) -> Path:
    """Save on every rank (ZeRO shards); then the main rank writes the consolidated fp32
    weights, marks the checkpoint complete, points `latest` at it and prunes old ones.
    Returns the checkpoint folder."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if env.is_main:
        export_weights(
            consolidated_fp32_state(engine, ckpt_dir, tag, cfg),
            config_to_yaml(cfg),
            folder / WEIGHTS,
        )
        write_json_atomic(folder / MARKER, {"step": step, "model": asdict(cfg.model)})
        write_text_atomic(ckpt_dir / "latest", tag)
        for _, old in complete_checkpoints(ckpt_dir)[: -cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def consolidated_fp32_state(engine, ckpt_dir: Path, tag: str, cfg: Config) -> dict:
    """The full model in fp32. With ZeRO (or bf16/fp16) the fp32 master weights live sharded in
    the optimizer states of every rank: DeepSpeed's zero_to_fp32 gathers them from the files
    just written. Without either, the module's own fp32 parameters are the master weights."""
    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    if cfg.ds.zero_stage > 0 or cfg.ds.precision != "fp32":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        masters = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        state.update({k: v.float() for k, v in masters.items()})
    return state


def load_latest(engine, ckpt_dir: Path) -> tuple[int, dict] | None:
    """Resume from the newest complete checkpoint; if it cannot be loaded, warn and fall back
    to the one before. Returns (step, client_state), or None when there is nothing to resume."""
    checkpoints = complete_checkpoints(ckpt_dir)
    for step, folder in reversed(checkpoints):
        try:
            path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=folder.name)
        except Exception as err:  # a damaged file surfaces as any of torch's load errors
            warnings.warn(
                f"checkpoint {folder} is damaged ({err}); trying the previous one", stacklevel=2
            )
            continue
        if path is None:
            warnings.warn(
                f"checkpoint {folder} could not be loaded; trying the previous one", stacklevel=2
            )
            continue
        return step, client_state
    if checkpoints:
        raise CheckpointError(f"no loadable checkpoint in {ckpt_dir}: all are damaged")
    return None
