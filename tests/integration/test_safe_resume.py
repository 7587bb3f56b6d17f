"""Resume never unpickles arbitrary objects (issue 12, case 4): a planted pickle in a checkpoint is
refused as tampered and never runs; real DeepSpeed checkpoints still resume under the allow-list."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capsdist.run_dir import CheckpointError
from capsdist.train.checkpoint import load_deepspeed_file
from data_tools.synthetic import make_synthetic_shards
from tests.conftest import run_capsdist

DEBUG = ["-c", "configs/debug_cpu.yaml", "train.checkpoint_every=2", "train.log_every=2"]
STEP4 = Path("checkpoints") / "step000000004"
ZERO1_FP32 = ("ds.zero_stage=1", "ds.precision=fp32")
ZERO2_BF16 = ("ds.zero_stage=2", "ds.precision=bf16")


class OpensFile:
    """Unpickling this creates `path` (as `open(path, "w")`): the proof that a load ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsShell:
    """Unpickling this runs `touch path` through os.system."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_shards(out)
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A run trained to step 4 (checkpoints at 2 and 4) per ds settings, made once; each test
    gets its own copy to resume or tamper with."""
    runs: dict[tuple[str, ...], Path] = {}

    def copy_of(ds: tuple[str, ...], dest: Path) -> list[str]:
        if ds not in runs:
            run = tmp_path_factory.mktemp("trained") / "run"
            out = run_capsdist(
                "train", *DEBUG, f"data.root={data}", f"run.dir={run}", "train.max_steps=4", *ds
            )
            assert out.returncode == 0, out.stderr[-3000:]
            runs[ds] = run
        shutil.copytree(runs[ds], dest)
        return [*DEBUG, f"data.root={data}", f"run.dir={dest}", *ds]

    return copy_of


def plant(path: Path, payload: object, *, torch_format: bool) -> None:
    """Replace a checkpoint file with `payload`, saved as torch.save does or as a bare pickle."""
    if torch_format:
        torch.save({"module": payload}, path)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.slow
@pytest.mark.parametrize(
    "victim, payload, torch_format, refused",
    [
        ("mp_rank_00_model_states.pt", OpensFile, True, "open)"),
        # A bare pickle (protocol 4) is refused at its first opcode, before torch names a global.
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", RunsShell, False, "allow-list"),
    ],
    ids=["model-states-torch-save", "zero-shard-bare-pickle"],
)
def test_planted_pickle_is_refused_as_tampered_and_never_runs(
    trained, tmp_path, victim, payload, torch_format, refused
):
    run = tmp_path / "run"
    args = trained(ZERO1_FP32, run)
    marker = tmp_path / "MARKER"
    planted = run / STEP4 / victim
    plant(planted, payload(marker), torch_format=torch_format)
    config_before = (run / "config.yaml").read_bytes()

    out = run_capsdist("train", *args, "train.max_steps=6")

    assert not marker.exists(), "the planted pickle ran"
    assert out.returncode == 2, out.stderr[-3000:]
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("capsdist train: error: refusing tampered checkpoint file")
    assert str(planted) in message and refused in message
    assert "damaged" not in out.stderr and "Traceback" not in out.stderr  # not skipped, no trace
    assert (run / "config.yaml").read_bytes() == config_before  # nothing overwritten
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == [
        "step000000002",
        "step000000004",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("ds", [ZERO1_FP32, ZERO2_BF16], ids=["zero1-fp32", "zero2-bf16"])
def test_deepspeed_checkpoints_resume_under_the_allow_list(trained, tmp_path, ds):
    """ZeRO-0 fp32 resumes in test_train_eval.py::test_resume_k_plus_k_equals_2k_straight."""
    run = tmp_path / "run"
    args = trained(ds, run)
    out = run_capsdist("train", *args, "train.max_steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 4" in out.stdout and out.result["step"] == 6
    assert "damaged" not in out.stderr  # every file loaded; none was skipped
    # The exported weights are the fp32 masters, gathered in memory: the same values DeepSpeed's
    # zero_to_fp32 reads back from the shards (trusted here: this test wrote them).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), "step000000006")
    exported = load_file(run / "checkpoints" / "step000000006" / "model.safetensors")
    for name, master in masters.items():
        torch.testing.assert_close(exported[name], master.float(), rtol=0, atol=0, msg=name)


def test_every_allow_listed_deepspeed_class_loads_and_others_are_refused(tmp_path):
    """Covers fp16's DynamicLossScaler too, whose checkpoints need a GPU to be written."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "loss_scaler": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False, dtype=torch.float16),
        "static": LossScaler(128),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": {"w": fragment_address(numel=6, start=0)},
        "weights": torch.ones(2, 3),
    }
    good = tmp_path / "good.pt"
    torch.save(state, good)
    loaded = load_deepspeed_file(good)
    assert loaded["loss_scaler"].cur_scale == 2.0**16
    assert loaded["loss_scaler"].dtype == torch.float16
    assert loaded["static"].cur_scale == 128
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"]["w"] == fragment_address(numel=6, start=0)

    marker = tmp_path / "MARKER"
    bad = tmp_path / "bad.pt"
    plant(bad, OpensFile(marker), torch_format=True)
    with pytest.raises(CheckpointError, match="tampered"):
        load_deepspeed_file(bad)
    assert not marker.exists()


def truncate(data: bytes) -> bytes:
    return data[:300]


def flip_a_bit_in_a_class_name(data: bytes) -> bytes:
    """The unpickler then refuses "tprch._utils..." as it would a planted class: only the zip's
    CRC-32 tells the two apart."""
    at = data.index(b"torch._utils") + 1
    return data[:at] + bytes([data[at] ^ 0x1F]) + data[at + 1 :]


@pytest.mark.parametrize("damage", [truncate, flip_a_bit_in_a_class_name])
def test_a_damaged_file_is_damaged_not_tampered(tmp_path, damage):
    """Damage stays an ordinary load error, so resume falls back to the previous checkpoint
    (test_fault_tolerance.py::test_damaged_newest_checkpoint_falls_back_to_the_previous)."""
    path = tmp_path / "states.pt"
    torch.save({"module": {"w": torch.ones(100)}}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises((RuntimeError, pickle.UnpicklingError)) as raised:  # torch's own errors
        load_deepspeed_file(path)
    assert not isinstance(raised.value, CheckpointError)
