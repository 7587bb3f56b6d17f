"""Saving and resuming DeepSpeed checkpoints in run.dir/checkpoints (layout: capsdist/run_dir.py);
a crash never loses the last good one.

DeepSpeed reads its own files with pickle (weights_only=False): resume only from run directories
you wrote yourself; `eval` and `validate` read the safetensors files only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch.distributed as dist

from capsdist.config import Config, config_to_yaml
from capsdist.distributed import DistEnv
from capsdist.run_dir import (
    WEIGHTS,
    CheckpointError,
    complete_checkpoints,
    export_weights,
    mark_complete,
    tag_for,
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
        mark_complete(folder, step, cfg, cfg.train.keep_last)
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
