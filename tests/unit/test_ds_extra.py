"""ds.extra (issue 15): DeepSpeed settings merged into the generated config and checked by
DeepSpeed's own config classes before anything starts; keys capsdist owns are refused."""

from __future__ import annotations

import pytest

from capsdist.config import ConfigError, load_config
from capsdist.distributed import BatchLayout, build_deepspeed_config


def deepspeed_config(*overrides: str, world_size: int = 2) -> dict:
    cfg = load_config(["configs/debug_cpu.yaml"], ["ds.zero_stage=2", *overrides])
    return build_deepspeed_config(cfg, BatchLayout.of(cfg, world_size))


def test_bucket_and_overlap_settings_are_merged_into_their_section():
    merged = deepspeed_config(
        "ds.extra.zero_optimization.overlap_comm=true",
        "ds.extra.zero_optimization.reduce_bucket_size=50000000",
        "ds.extra.zero_optimization.allgather_bucket_size=50000000",
        "ds.extra.communication_data_type=fp32",
    )
    assert merged["zero_optimization"] == {
        "stage": 2,
        "compute_grad_norm": False,
        "overlap_comm": True,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    assert merged["communication_data_type"] == "fp32"
    assert merged["train_batch_size"] == 32  # what capsdist computes is untouched
    assert "extra" not in merged


def test_the_per_step_device_checks_are_off_without_clipping_and_can_be_turned_back_on():
    """compute_grad_norm / check_grad_overflow read a device flag every step (a host sync);
    without clipping the loop's NaN check replaces them. With clipping DeepSpeed needs them."""
    bf16 = deepspeed_config("ds.precision=bf16")
    assert bf16["zero_optimization"]["compute_grad_norm"] is False
    assert bf16["bf16"] == {"enabled": True, "check_grad_overflow": False}
    clipped = deepspeed_config("ds.precision=bf16", "ds.gradient_clipping=1.0")
    assert "compute_grad_norm" not in clipped["zero_optimization"]
    assert clipped["bf16"] == {"enabled": True}
    back_on = deepspeed_config("ds.precision=bf16", "ds.extra.bf16.check_grad_overflow=true")
    assert back_on["bf16"]["check_grad_overflow"] is True
    assert deepspeed_config("ds.zero_stage=0")["zero_optimization"] == {"stage": 0}


def test_without_extra_the_config_is_capsdist_s_own():
    assert deepspeed_config() == {
        "train_batch_size": 32,
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "compute_grad_norm": False},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "ds.extra.zero_optimisation.overlap_comm=true",
            "has no setting 'zero_optimisation' (did you mean 'zero_optimization'?)",
        ),
        ("ds.extra.zero_optimization.overlap_com=true", "overlap_com"),
        ("ds.extra.zero_optimization.reduce_bucket_size=big", "reduce_bucket_size"),
        ("ds.extra.communication_data_type=fp8", "communication_data_type"),
        ("ds.extra.zero_optimization.stage=3", "use ds.zero_stage instead"),
        ("ds.extra.bf16.enabled=true", "use ds.precision instead"),
        ("ds.extra.train_batch_size=64", "use train.batch_size instead"),
        ("ds.extra.optimizer.type=SGD", "ds.extra.optimizer is set by capsdist"),
    ],
)
def test_refused_before_training_naming_the_key(override, message):
    with pytest.raises(ConfigError, match="ds.extra") as caught:
        deepspeed_config(override)
    assert message in str(caught.value)


def test_a_misspelt_section_of_ds_extra_itself_is_an_unknown_key():
    with pytest.raises(ConfigError, match="did you mean 'ds.extra'"):
        load_config([], ["ds.extr.zero_optimization.overlap_comm=true"])
