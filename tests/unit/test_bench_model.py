"""`capsdist bench model`: the JSON it prints, its FLOP count, and its plain comparison."""

from __future__ import annotations

import json

import pytest

from capsdist.bench.model import num_step_flops
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


@pytest.mark.slow
def test_bench_model_prints_its_measurements_and_beats_the_plain_model():
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
    # debug_cpu measured 3.8x faster than the plain model here: a wide margin over noise.
    assert out["plain"]["step_ms"] > 0 and out["speedup_vs_plain"] > 1
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
    main([str(tmp_path / "r.json")], docs)
    text = (docs / "results.md").read_text()
    assert "keep me" in text and "old" not in text
    assert text.count("## Performance") == 1 and "| 1.16 |" in text
    main([str(tmp_path / "r.json")], docs)  # idempotent
    assert (docs / "results.md").read_text() == text
    assert "| 50.0 |" in (docs / "bench.md").read_text()
