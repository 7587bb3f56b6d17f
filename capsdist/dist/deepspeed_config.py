"""The DeepSpeed config dict, built in exactly one place from the typed config."""

from __future__ import annotations

from capsdist.config.schema import Config, ConfigError


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient-accumulation steps) for the global `train.batch_size`."""
    global_batch = cfg.train.batch_size
    micro = cfg.train.micro_batch_size or global_batch // world_size
    if micro < 1 or global_batch % (micro * world_size):
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by world size {world_size} × "
            f"train.micro_batch_size={micro}: pick a global batch that is a multiple of "
            f"{micro * world_size if micro else world_size}"
        )
    return micro, global_batch // (micro * world_size)


def build_deepspeed_config(cfg: Config, world_size: int) -> dict:
    """Everything DeepSpeed needs; the optimiser and LR schedule are passed as objects (the
    reference's Adam + exponential decay), so none are declared here."""
    micro, accumulation = batch_layout(cfg, world_size)
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": cfg.ds.zero_stage},
        # A client (torch) Adam under ZeRO is fine for us; DeepSpeed asks to be told so.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.ds.precision == "bf16"},
        "fp16": {"enabled": cfg.ds.precision == "fp16"},
        "gradient_clipping": cfg.ds.gradient_clipping,
        "steps_per_print": 2**31 - 1,  # our progress bar reports; silence DeepSpeed's own
        "wall_clock_breakdown": False,
    }
