"""Two ranks under torchrun and the deepspeed launcher (gloo, DeepSpeed on CPU); what
`make launch` passes on and refuses before starting any."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from capsdist.distributed import free_port
from tests.conftest import ROOT, CliResult, cli_env, run_capsdist

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> CliResult:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "capsdist",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def launch(args: str, timeout: float = 300, **env: str) -> CliResult:
    """launch/launch.sh (what `make launch` runs) with debug_cpu.yaml and ARGS. Not through make:
    its `install` prerequisite would reinstall the venv whenever pyproject.toml is newer, and make
    exits 2 for any failure."""
    env = cli_env(CONFIG="configs/debug_cpu.yaml", ARGS=args, MASTER_PORT=str(free_port()), **env)
    proc = subprocess.run(
        ["bash", "launch/launch.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def test_launch_passes_quoted_paths_with_spaces(mnist_sample, tmp_path):
    data, run = tmp_path / "my data", tmp_path / "my run"
    data.symlink_to(mnist_sample)
    args = f"data.root={shlex.quote(str(data))} run.dir={shlex.quote(str(run))} train.max_steps=2"
    out = launch(args, NPROC="1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("train.lr=nan", "train.lr must be a finite number > 0, got nan"),
        ("run.dir='/tmp/no closing quote", "ARGS: No closing quotation"),
    ],
)
def test_launch_refuses_a_bad_config_once_before_starting(tmp_path, args, message):
    """torchrun would retry a deterministic config error MAX_RESTARTS times."""
    out = launch(f"{args} run.dir={tmp_path / 'run'}", MAX_RESTARTS="3", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"launch: error: {message}"]
    assert not (tmp_path / "run").exists()


def test_two_ranks_read_disjoint_shards_and_end_identical(mnist_sample, tmp_path):
    run = tmp_path / "run"
    out = torchrun(
        "train",
        "-c",
        "configs/debug_cpu.yaml",
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=20",
        "train.checkpoint_every=10",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = out.result
    assert result["step"] == 20 and result["replicas_in_sync"] is True
    plan = json.loads((run / "data_plan.json").read_text())["shards_by_rank"]
    meta = json.loads((mnist_sample / "meta.json").read_text())
    train_shards = sorted(name for name in meta["shards"] if name.startswith("train-"))
    assert len(plan) == 2 and all(plan)
    assert not set(plan[0]) & set(plan[1])
    assert sorted(plan[0] + plan[1]) == train_shards
    ds_config = json.loads((run / "deepspeed_config.json").read_text())
    assert ds_config["train_batch_size"] == 32 and ds_config["train_micro_batch_size_per_gpu"] == 16


def test_indivisible_global_batch_is_refused(mnist_sample, tmp_path):
    out = torchrun(
        "train",
        "-c",
        "configs/debug_cpu.yaml",
        f"data.root={mnist_sample}",
        f"run.dir={tmp_path / 'run'}",
        "train.batch_size=33",
    )
    assert out.returncode != 0
    assert "train.batch_size=33" in out.stderr
    assert not (tmp_path / "run").exists()


def test_zero2_bf16_checkpoint_is_consolidated_into_fp32_master_weights(mnist_sample, tmp_path):
    run = tmp_path / "run"
    out = torchrun(
        "train",
        "-c",
        "configs/debug_cpu.yaml",
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=10",
        "ds.zero_stage=2",
        "ds.precision=bf16",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "deepspeed_config.json").read_text())["bf16"]["enabled"] is True
    weights = load_file(run / "model.safetensors")
    w = weights["classes.weight"]
    assert w.dtype == torch.float32
    # The optimizer's fp32 masters, gathered from both ranks' ZeRO shards: not bf16 values.
    assert (w != w.bfloat16().float()).float().mean() > 0.5
    scores = run_capsdist(
        "eval", "-c", "configs/debug_cpu.yaml", f"data.root={mnist_sample}", f"ckpt={run}"
    )
    assert scores.returncode == 0 and scores.result["num_examples"] == 1000
