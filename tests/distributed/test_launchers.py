"""Two ranks under torchrun and the deepspeed launcher (gloo, DeepSpeed on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

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
