"""`capsdist bench model`: the JSON it prints, its FLOP count, and its plain comparison."""

from __future__ import annotations

import json

import pytest
import torch

from capsdist.bench.model import (
    mfu,
    num_step_flops,
    num_step_flops_by_part,
    part_precisions,
    peak_tflops,
)
from capsdist.config import load_config
from tests.conftest import run_capsdist


def test_flop_count_of_the_paper_mnist_model_by_hand():
    cfg = load_config(["configs/mnist.yaml"], ["train.batch_size=1", "model.reconstruction=false"])
    conv1 = 2 * 20 * 20 * 256 * 1 * 81  # 28 → 20, VALID
    primary = 2 * 6 * 6 * 256 * 256 * 81  # 20 → 6, stride 2
    votes = 2 * 1152 * 8 * 10 * 16
    routing = 2 * 1152 * 10 * 16 * 4  # 2 weighted sums + 2 agreements after iteration 1
    forward = conv1 + primary + 2 * votes + routing  # iteration 1: a GEMM as costly as the votes
    assert num_step_flops(cfg) == forward + 2 * (forward - conv1) + conv1
    parts = num_step_flops_by_part(cfg)
    assert parts["conv"] == 2 * conv1 + 3 * primary and parts["decoder"] == 0
    assert parts["capsules"] == 3 * (2 * votes + routing)


def test_mfu_divides_each_part_by_the_peak_of_the_precision_it_runs_in():
    """H200 SXM (data sheet, dense): fp32 67, TF32 494.5, bf16 989.5 TFLOP/s."""
    peaks = peak_tflops("NVIDIA H200")
    assert peaks == {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}
    assert peak_tflops("NVIDIA H100 PCIe")["bf16"] == 756.5  # not the SXM part's figure
    assert peak_tflops("NVIDIA H200 NVL")["fp32"] == 60.0
    assert peak_tflops("NVIDIA GeForce RTX 3060") is None
    flops = {"conv": int(494.5e12), "capsules": int(67e12), "decoder": int(989.5e12)}
    precisions = {"conv": "tf32", "capsules": "fp32", "decoder": "bf16"}
    # Each part would take 1 s at its peak: 3 s of ideal work in a 6 s step is 50 %.
    assert mfu(flops, precisions, 6.0, peaks) == 0.5
    assert mfu(flops, precisions, 6.0, None) is None


def test_part_precisions_follow_ds_precision_and_the_tf32_switches():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    # PyTorch's defaults: cuDNN convolutions in TF32, matmuls in IEEE fp32.
    assert part_precisions("fp32", gpu) == {"conv": "tf32", "capsules": "fp32", "decoder": "fp32"}
    # DeepSpeed bf16: convs and decoder in bf16; routing (votes included) stays fp32.
    assert part_precisions("bf16", gpu) == {"conv": "bf16", "capsules": "fp32", "decoder": "bf16"}
    assert set(part_precisions("fp32", cpu).values()) == {"fp32"}
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        assert part_precisions("fp32", gpu)["capsules"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.slow
def test_bench_model_prints_its_measurements_and_the_plain_models():
    result = run_capsdist(
        "bench", "model", "-c", "configs/debug_cpu.yaml", "--steps", "3", "--compare-plain"
    )
    assert result.returncode == 0, result.stderr
    out = result.result
    for key in ("images_per_s", "step_ms", "peak_mem_mb", "step_over_conv_bound", "config"):
        assert key in out
    assert out["images_per_s"] > 0 and out["peak_mem_mb"] > 0
    assert out["step_over_conv_bound"] > 1  # the floor is part of the step
    assert out["config"]["batch_size"] == 32 and out["config"]["device"] == "cpu"
    assert out["mfu"] is None  # no GPU here
    assert sum(out["flops_by_part"].values()) == out["flops_per_step"]
    assert out["config"]["zero_stage"] == 0 and "DeepSpeed engine" in out["config"]["optimizer"]
    # Both models timed in an engine; how much faster the fast one is depends on the machine's
    # load (2 shared cores here): no wall-clock comparison in a test, only the figures.
    assert out["plain"]["step_ms"] > 0 and out["speedup_vs_plain"] > 0
    ratio = out["plain"]["step_ms"] / out["step_ms"]
    assert out["speedup_vs_plain"] == pytest.approx(ratio, rel=0.01, abs=0.002)
    assert "bench" in result.stderr  # the progress bar


def test_bench_model_refuses_a_cnn_with_a_one_line_error():
    result = run_capsdist(
        "bench", "model", "-c", "configs/debug_cpu.yaml", "model.name=baseline", "loss.name=softmax"
    )
    assert result.returncode == 2
    assert "bench model times CapsNets" in result.stderr


def test_report_replaces_only_the_performance_section(tmp_path):
    from capsdist.bench.report import main

    result = {
        "images_per_s": 50.0, "step_ms": 1280.0, "peak_mem_mb": 900.0, "conv_floor_ms": 1100.0,
        "step_over_conv_bound": 1.16, "achieved_tflops": 0.06, "mfu": None,
        "config": {"files": ["configs/mnist.yaml"], "overrides": [], "precision": "fp32",
                   "batch_size": 64, "device": "cpu", "threads": 2},
    }  # fmt: skip
    (tmp_path / "r.json").write_text("progress\n" + json.dumps(result) + "\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\n## Demo\nkeep me\n\n## Performance\nold\n")
    (docs / "bench.md").write_text("# Benchmarks\n\n## What is measured\nkept too\n")
    main([str(tmp_path / "r.json")], docs)
    text = (docs / "results.md").read_text()
    assert "keep me" in text and "old" not in text
    assert text.count("## Performance") == 1 and "| 1.16 |" in text
    main([str(tmp_path / "r.json")], docs)  # idempotent
    assert (docs / "results.md").read_text() == text
    bench = (docs / "bench.md").read_text()
    assert "| 50.0 |" in bench and "kept too" in bench and bench.count("## Latest make bench") == 1
