"""What a training job starts from: the model and its engine, then run.dir's newest checkpoint
(train.resume), or else the weights of train.init_from (a warm start), or else a fresh model;
and where in the data each rank begins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from capsdist.config import Config
from capsdist.data import ShardReader
from capsdist.distributed import BatchLayout, DistEnv, build_engine
from capsdist.distributed.masters import set_fp32_weights
from capsdist.models import build_model
from capsdist.run_dir import CHECKPOINTS, complete_checkpoints
from capsdist.train.checkpoint import resume_latest
from capsdist.train.data_position import DataLayout, DataPosition, Streams, plan_resume
from capsdist.train.warm_start import init_weights


@dataclass
class Start:
    engine: object  # deepspeed.DeepSpeedEngine
    step: int
    """The step training continues after (0 for a new run)."""
    position: DataPosition
    streams: Streams
    notes: list[str] = field(default_factory=list)
    """What the main rank logs: the resume and what changed, the data, the warm start."""
    pacing: dict = field(default_factory=dict)
    """The training clock and schedule horizon of the checkpoint resumed from (pacing.py)."""


def build_start(
    cfg: Config,
    env: DistEnv,
    meta: dict,
    layout: BatchLayout,
    ds_config: dict,
    reader: ShardReader,
) -> Start:
    """Model → engine → resume or warm start → data position; on every rank."""
    ckpt_dir = Path(cfg.run.dir) / CHECKPOINTS
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    # A warm start is for a new run; checked before the engine is built, so a mismatch fails
    # in seconds.
    has_own = bool(complete_checkpoints(ckpt_dir))
    warm = init_weights(cfg, model) if cfg.train.init_from and not has_own else None
    engine = build_engine(model, cfg, env, ds_config)
    resumed = resume_latest(engine, ckpt_dir, cfg, env)
    notes = [resumed.message] if resumed else []
    if warm:
        set_fp32_weights(engine, warm[0])  # into the fp32 masters too, whatever the precision
        notes.append(warm[1])
    elif cfg.train.init_from:
        notes.append(f"train.init_from={cfg.train.init_from} ignored: run.dir has checkpoints")
    step = resumed.step if resumed else 0
    # The same data layout continues each rank's stream; another one first reads the rest of
    # the epoch in progress as the old layout would have (train/data_position.py).
    now = DataLayout(env.world_size, layout.micro_batch, cfg.data.num_workers)
    streams = Streams(cfg, meta, reader.device, {(now, env.rank): reader})
    saved = resumed.data if resumed and resumed.data else DataPosition(now)
    position, data_note = plan_resume(saved, step, now, cfg.train.batch_size, streams.epoch_length)
    notes += [data_note] if data_note else []
    return Start(engine, step, position, streams, notes, resumed.pacing if resumed else {})
