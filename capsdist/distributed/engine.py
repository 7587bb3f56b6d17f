"""DeepSpeed from outside the model: the batch layout and the DeepSpeed config (each computed once
per run, in this module only), the process group, and the engine with the reference's optimiser
and learning-rate schedule (or a budget schedule: schedules.py, train.lr_schedule)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from capsdist.config.schema import Config, ConfigError, TrainConfig
from capsdist.distributed.ds_extra import merge_extra
from capsdist.distributed.env import DistEnv, export_rendezvous, pick_device
from capsdist.distributed.schedules import BudgetSchedule
from capsdist.extensions import build_lock


@dataclass(frozen=True)
class BatchLayout:
    """How the global `train.batch_size` splits into ranks × micro-batch × accumulation steps."""

    micro_batch: int
    """Samples per rank and forward pass."""
    accumulation: int
    """Micro-batches per optimizer step."""

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> BatchLayout:
        global_batch = cfg.train.batch_size
        micro = cfg.train.micro_batch_size or global_batch // world_size
        if micro < 1 or global_batch % (micro * world_size):
            raise ConfigError(
                f"train.batch_size={global_batch} is not divisible by world size {world_size} × "
                f"train.micro_batch_size={micro}: pick a global batch that is a multiple of "
                f"{micro * world_size if micro else world_size}"
            )
        return cls(micro, global_batch // (micro * world_size))


def build_deepspeed_config(cfg: Config, layout: BatchLayout) -> dict:
    """Everything DeepSpeed needs; the optimiser and LR schedule are passed as objects (the
    reference's Adam + exponential decay), so none are declared here. `ds.extra` is merged in
    and checked by DeepSpeed's config classes (ConfigError naming the key if it refuses it)."""
    generated = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.accumulation,
        "zero_optimization": {"stage": cfg.ds.zero_stage},
        # A client (torch) Adam under ZeRO is fine for us; DeepSpeed asks to be told so.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.ds.precision == "bf16"},
        "fp16": {"enabled": cfg.ds.precision == "fp16"},
        "gradient_clipping": cfg.ds.gradient_clipping,
        "steps_per_print": 2**31 - 1,  # our progress bar reports; silence DeepSpeed's own
        "wall_clock_breakdown": False,
    }
    if cfg.ds.gradient_clipping == 0:
        # Without clipping these only serve checks that read a device flag on every step (a
        # host sync; measured under ZeRO-1/2 with a read counter): the loop's own NaN check at
        # log steps replaces them. ds.extra can turn either back on.
        if cfg.ds.zero_stage in (1, 2):
            generated["zero_optimization"]["compute_grad_norm"] = False
        if cfg.ds.precision == "bf16":
            generated["bf16"]["check_grad_overflow"] = False
    if not cfg.ds.extra:
        return generated
    import_deepspeed()
    return merge_extra(generated, cfg.ds.extra)


@dataclass
class ReferenceDecay:
    """lr factor = rate^(step / decay_steps), continuous, floored at lr_min (experiment.py).

    A class rather than a lambda so that LambdaLR can save it in checkpoints.
    """

    rate: float
    decay_steps: int
    floor_factor: float

    @classmethod
    def from_config(cls, train: TrainConfig) -> ReferenceDecay:
        return cls(train.lr_decay_rate, train.lr_decay_steps, train.lr_min / train.lr)

    def __call__(self, step: int) -> float:
        return max(self.rate ** (step / self.decay_steps), self.floor_factor)


def build_lr_factor(train: TrainConfig) -> ReferenceDecay | BudgetSchedule:
    """The factor on train.lr at each step that train.lr_schedule names (a picklable callable
    for LambdaLR: its fields are saved with DeepSpeed's checkpoints)."""
    if train.lr_schedule == "reference":
        return ReferenceDecay.from_config(train)
    return BudgetSchedule.from_config(train)


def import_deepspeed():
    """Import DeepSpeed with the CPU accelerator when there is no GPU, and keep it quiet."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


def init_process_group(env: DistEnv) -> None:
    """Join the job's process group (gloo on CPU, NCCL on GPU) before anything collective."""
    export_rendezvous(env)
    deepspeed = import_deepspeed()
    _load_comm_op(deepspeed)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "TORCHELASTIC_RESTART_COUNT" in os.environ and env.world_size > 1:
        _init_elastic_process_group(env, backend)  # DeepSpeed then wraps the existing group
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _load_comm_op(deepspeed) -> None:
    """Build or load DeepSpeed's shared-memory CPU comm op under capsdist's build lock (a build
    killed half-way would otherwise hang every later run: capsdist/extensions.py). It happens
    here, before the rendezvous, because init_distributed loads it and then waits for the other
    ranks: holding the lock across that wait would deadlock them. DeepSpeed keeps the loaded
    module, so init_distributed reuses it."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    # DeepSpeed's own condition for loading it (deepspeed/comm/torch.py: build_shm_op).
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    with build_lock(builder.name):
        builder.load()


def _init_elastic_process_group(env: DistEnv, backend: str) -> None:
    """Under torchrun, workers restarted after a crash reuse the agent's TCPStore, whose keys
    still hold the dead workers' addresses: gloo then connects to them and fails ("Connection
    refused", measured with torch 2.13). A prefix per restart round gives every round fresh keys.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=env.rank == 0 and not agent_store,
        timeout=timedelta(minutes=10),
    )
    restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
    prefixed = dist.PrefixStore(f"capsdist/restart{restart}", store)
    dist.init_process_group(backend, store=prefixed, rank=env.rank, world_size=env.world_size)


def leave_process_group() -> None:
    """Destroy the job's process group, so that the same process can train again (sweeps and
    notebooks call `run_training` more than once). Workaround: DeepSpeed caches a clone of the
    world group in `deepspeed.utils.groups._WORLD_GROUP` and would hand the destroyed one to the
    next engine ("Group ... is not registered", DeepSpeed 0.19)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None


def build_optimizer(parameters, train: TrainConfig) -> torch.optim.Adam:
    """The reference's Adam: TensorFlow's AdamOptimizer defaults (betas 0.9 / 0.999, eps 1e-8),
    with train.lr and train.adam_beta1 / adam_beta2. The fused kernel does the same maths in one
    pass: ~96 ms instead of ~282 ms per step for the 8.2 M-parameter MNIST model on 2 CPU cores
    (capsdist bench model)."""
    betas = (train.adam_beta1, train.adam_beta2)
    return torch.optim.Adam(parameters, lr=train.lr, betas=betas, eps=1e-8, fused=True)


def build_engine(model: torch.nn.Module, cfg: Config, env: DistEnv, ds_config: dict):
    """The DeepSpeed engine around `model` (DeepSpeed config `ds_config`, from
    `build_deepspeed_config`), with the reference's Adam and train.lr_schedule's learning
    rate (the reference's decay by default)."""
    if cfg.ds.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "ds.precision=fp16 needs a GPU: DeepSpeed's CPU accelerator has no fp16; use "
            "ds.precision=bf16 or fp32 on CPU"
        )
    deepspeed = import_deepspeed()
    if torch.cuda.is_available():
        torch.cuda.set_device(pick_device(env.local_rank))
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=build_lr_factor(cfg.train))
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
        )
    except (AssertionError, ValueError, NotImplementedError) as err:
        if not cfg.ds.extra:
            raise
        # Some combinations only fail when the engine is built (e.g. bf16 with fp32 gradient
        # accumulation under ZeRO-0): name the keys the user added.
        raise ConfigError(
            f"DeepSpeed cannot train with ds.extra={cfg.ds.extra} (ds.zero_stage="
            f"{cfg.ds.zero_stage}, ds.precision={cfg.ds.precision}): {err}"
        ) from err
    return engine
