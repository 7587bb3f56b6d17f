"""A run continues across a changed cluster shape (issue 15): 2 ranks (ZeRO-1, fp32) → 1 rank
(ZeRO-2, bf16) → 2 ranks (ZeRO-0, bf16), same run.dir. Each job says what changed and none
says "damaged"; at each switch the new engine holds exactly the weights, Adam moments, Adam
step and learning rate saved before it (read back from the live engine by topology_probe.py);
the run ends at its last step with identical replicas. Real torchrun, gloo, DeepSpeed on CPU.

Plus the other ways a run starts from a checkpoint: a damaged file is still called damaged (and
the one before is used), train.resume=weights_only and never."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from capsdist.config import load_config
from capsdist.run_dir import RunDirError
from capsdist.train import run_training
from data_tools.synthetic import make_synthetic_shards
from tests.conftest import ROOT, CliResult, cli_env, small_run
from tests.integration.topology_probe import probe

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_shards(out, n_train=256, n_test=32, samples_per_shard=32)  # 8 shards
    return out


def settings(data, run, *more: str) -> list[str]:
    return small_run(data, run, "train.checkpoint_every=2", *more)


def torchrun(module: str, *args: str, timeout: float = 600) -> CliResult:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def train_2_ranks(data, run, *more: str) -> CliResult:
    return torchrun(
        "capsdist", "train", "-c", "configs/debug_cpu.yaml", *settings(data, run, *more)
    )


def assert_resumed_exactly(probed, folder, run) -> str:
    """The state a job resumed with (probed from its engine) is the one saved in `folder`."""
    state = load_file(probed)
    weights = load_file(folder / "model.safetensors")
    moments = load_file(folder / "optimizer.safetensors")
    assert weights.keys() == {k.removeprefix("weights.") for k in state if k.startswith("weights.")}
    for name, saved in weights.items():
        assert torch.equal(state[f"weights.{name}"], saved), name
    assert moments, "Adam's moments were saved"
    for name, saved in moments.items():
        assert torch.equal(state[name], saved), name
    with safe_open(str(probed), framework="pt") as f:
        meta = f.metadata()
    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        assert meta["adam_step"] == f.metadata()["adam_step"] != "0"
    step = json.loads((folder / "capsdist.json").read_text())["step"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert float(meta["lr"]) == pytest.approx([m["lr"] for m in lines if m["step"] == step][-1])
    return meta["message"]


def test_two_to_one_to_two_ranks_with_other_zero_and_precision(data, tmp_path, capsys):
    run = tmp_path / "run"
    first = train_2_ranks(data, run, "ds.zero_stage=1", "ds.precision=fp32", "train.max_steps=4")
    assert json.loads(first.stdout.splitlines()[-1])["step"] == 4

    # 2 ranks → 1 (ZeRO 1→2, fp32→bf16): in this process.
    one_rank = settings(data, run, "ds.zero_stage=2", "ds.precision=bf16")
    probe(tmp_path / "at4.safetensors", one_rank)
    message = assert_resumed_exactly(
        tmp_path / "at4.safetensors", run / "checkpoints/step000000004", run
    )
    assert message.endswith("at step 4: world 2→1, ZeRO 1→2, fp32→bf16")
    capsys.readouterr()
    second = run_training(load_config(["configs/debug_cpu.yaml"], [*one_rank, "train.max_steps=7"]))
    out = capsys.readouterr()
    assert second["step"] == 7 and "at step 4: world 2→1, ZeRO 1→2, fp32→bf16" in out.out
    # 2 ranks × 12 batches of 8 were left in epoch 0: steps 4-15 read them as 2 ranks would.
    assert "data: steps 4-15 read the rest of the epoch in progress" in out.out

    # 1 rank → 2 (ZeRO 2→0), in the middle of that replay.
    two_ranks = settings(data, run, "ds.zero_stage=0", "ds.precision=bf16")
    torchrun("tests.integration.topology_probe", tmp_path / "at7.safetensors", *two_ranks)
    message = assert_resumed_exactly(
        tmp_path / "at7.safetensors", run / "checkpoints/step000000007", run
    )
    assert message.endswith("at step 7: world 1→2, ZeRO 2→0")
    third = train_2_ranks(data, run, "ds.zero_stage=0", "ds.precision=bf16", "train.max_steps=10")
    assert "at step 7: world 1→2, ZeRO 2→0" in third.stdout
    result = json.loads(third.stdout.splitlines()[-1])
    assert result["step"] == 10 and result["replicas_in_sync"]
    for output in (first.stdout + first.stderr, out.out + out.err, third.stdout + third.stderr):
        assert "damaged" not in output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def one_process(data, run, *more: str) -> dict:
    cfg = load_config(
        ["configs/debug_cpu.yaml"], settings(data, run, "train.checkpoint_every=1", *more)
    )
    return run_training(cfg)


def test_damaged_file_is_still_damaged_and_the_previous_checkpoint_is_used(data, tmp_path):
    run = tmp_path / "run"
    one_process(data, run, "train.max_steps=2")
    damaged = run / "checkpoints/step000000002/optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step000000002 is damaged"):
        probe(tmp_path / "p.safetensors", settings(data, run, "ds.zero_stage=2"))
    message = assert_resumed_exactly(
        tmp_path / "p.safetensors", run / "checkpoints/step000000001", run
    )
    assert message.endswith("at step 1: ZeRO 0→2")


def test_resume_weights_only_and_never(data, tmp_path, capsys):
    run = tmp_path / "run"
    one_process(data, run, "train.max_steps=2")
    probe(tmp_path / "p.safetensors", settings(data, run, "train.resume=weights_only"))
    state = load_file(tmp_path / "p.safetensors")
    saved = load_file(run / "checkpoints/step000000002/model.safetensors")
    assert all(torch.equal(state[f"weights.{k}"], v) for k, v in saved.items())
    assert not [k for k in state if k.startswith("exp_avg")]  # a fresh Adam: no state yet
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert "weights only, a fresh Adam state" in f.metadata()["message"]
    capsys.readouterr()
    assert one_process(data, run, "train.max_steps=3", "train.resume=weights_only")["step"] == 3
    assert "at step 2" in capsys.readouterr().out
    with pytest.raises(RunDirError, match="train.resume=never"):
        one_process(data, run, "train.max_steps=4", "train.resume=never")
    assert (
        one_process(data, tmp_path / "new", "train.max_steps=1", "train.resume=never")["step"] == 1
    )
