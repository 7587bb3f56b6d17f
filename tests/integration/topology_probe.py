"""Run by test_topology_resume.py (in-process, or under torchrun for several ranks): build the
engine a training job with these settings builds, resume run.dir's newest checkpoint exactly as
`run_training` does, and save what it resumed with, gathered from the live engine (the main
rank writes OUT.safetensors). Not a test itself.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m tests.integration.topology_probe OUT key=value ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from capsdist.config import load_config
from capsdist.distributed import (
    BatchLayout,
    DistEnv,
    build_deepspeed_config,
    build_engine,
    init_process_group,
    leave_process_group,
)
from capsdist.distributed.masters import adam_state, full_fp32_state
from capsdist.models import build_model
from capsdist.run_dir import CHECKPOINTS
from capsdist.train.checkpoint import resume_latest


def probe(out: Path, overrides: list[str]) -> None:
    cfg = load_config(["configs/debug_cpu.yaml"], overrides)
    env = DistEnv.from_environ()
    init_process_group(env)
    try:
        ds_config = build_deepspeed_config(cfg, BatchLayout.of(cfg, env.world_size))
        torch.manual_seed(cfg.seed)
        engine = build_engine(build_model(cfg.model), cfg, env, ds_config)
        resumed = resume_latest(engine, Path(cfg.run.dir) / CHECKPOINTS, cfg, env)
        weights = full_fp32_state(engine)
        moments, step = adam_state(engine)
        if env.is_main:
            tensors = {**{f"weights.{k}": v for k, v in weights.items()}, **moments}
            metadata = {
                "adam_step": str(step),
                "message": resumed.message,
                "lr": str(engine.get_lr()[0]),
            }
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    finally:
        leave_process_group()


if __name__ == "__main__":
    probe(Path(sys.argv[1]), sys.argv[2:])
