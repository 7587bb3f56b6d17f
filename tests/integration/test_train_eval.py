"""`capsdist train` and `capsdist eval` end to end on real MNIST digits, as a user runs them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_capsdist

pytestmark = pytest.mark.slow

DEBUG = ["-c", "configs/debug_cpu.yaml"]


def test_train_then_eval_writes_everything_and_learns(mnist_sample, tmp_path):
    run = tmp_path / "run"
    train = run_capsdist(
        "train", *DEBUG, f"data.root={mnist_sample}", f"run.dir={run}", "train.max_steps=60"
    )
    assert train.returncode == 0, train.stderr
    result = train.result
    assert result["step"] == 60 and result["run_dir"] == str(run)
    assert result["images_per_s"] > 0 and result["train_accuracy"] > 0.3  # 10 classes: chance 0.1
    assert "train:" in train.stderr and "60/60" in train.stderr  # the progress bar
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "deepspeed_config.json"):
        assert (run / name).exists(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 30, 40, 50, 60]
    assert lines[-1]["loss"] < lines[0]["loss"]

    evaluation = run_capsdist("eval", *DEBUG, f"data.root={mnist_sample}", f"ckpt={run}")
    assert evaluation.returncode == 0, evaluation.stderr
    scores = evaluation.result
    assert scores["num_examples"] == 1000
    assert 0.3 < scores["accuracy"] <= 1.0
    assert json.loads((run / "eval.json").read_text())["accuracy"] == scores["accuracy"]


def test_resume_k_plus_k_equals_2k_straight(mnist_sample, tmp_path):
    common = [*DEBUG, f"data.root={mnist_sample}", "train.checkpoint_every=8", "train.log_every=4"]
    straight = run_capsdist("train", *common, f"run.dir={tmp_path / 'a'}", "train.max_steps=16")
    assert straight.returncode == 0, straight.stderr
    first = run_capsdist("train", *common, f"run.dir={tmp_path / 'b'}", "train.max_steps=8")
    assert first.returncode == 0, first.stderr
    second = run_capsdist("train", *common, f"run.dir={tmp_path / 'b'}", "train.max_steps=16")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout + second.stderr and "at step 8" in second.stdout
    assert second.result["step"] == 16
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert straight.result["loss"] == pytest.approx(second.result["loss"], rel=1e-5)


def test_time_limit_stops_cleanly_with_checkpoint_and_export(mnist_sample, tmp_path):
    run = tmp_path / "run"
    out = run_capsdist(
        "train",
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=100000",
        "train.time_limit_s=2",
    )
    assert out.returncode == 0, out.stderr
    step = out.result["step"]
    assert 0 < step < 100000
    assert (run / "model.safetensors").exists()
    assert (run / "checkpoints" / f"step{step:09d}" / "capsdist.json").exists()


def test_wandb_offline_run_is_written_and_resumed_with_the_same_id(mnist_sample, tmp_path):
    run = tmp_path / "run"
    common = [
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "wandb.mode=offline",
        "train.checkpoint_every=2",
        "train.log_every=2",
    ]
    first = run_capsdist("train", *common, "train.max_steps=2", WANDB_MODE="offline")
    assert first.returncode == 0, first.stderr
    second = run_capsdist("train", *common, "train.max_steps=4", WANDB_MODE="offline")
    assert second.returncode == 0, second.stderr
    run_id = (run / "wandb_train_id.txt").read_text().strip()
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)


def test_periodic_evaluation_and_callbacks_in_process(mnist_sample, tmp_path):
    """The Python API the sweeps use: run_training with callbacks, evaluating as it goes."""
    from capsdist.config import load_config
    from capsdist.train import run_training

    cfg = load_config(
        ["configs/debug_cpu.yaml"],
        [
            f"data.root={mnist_sample}",
            f"run.dir={tmp_path / 'run'}",
            "train.max_steps=20",
            "train.eval_every=10",
            "eval.max_examples=200",
        ],
    )
    seen = []
    result = run_training(cfg, callbacks=[lambda step, m, model: seen.append((step, dict(m)))])
    assert [step for step, _ in seen] == [10, 20]
    assert all(0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_loss"] > 0 for _, m in seen)
    assert result["eval_accuracy"] == seen[-1][1]["eval_accuracy"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum("eval_accuracy" in line for line in lines) == 2


def test_cifar10_config_trains_on_crops_of_32x32_shards(tmp_path):
    from data_tools.synthetic import make_synthetic_shards

    data, run = tmp_path / "cifar", tmp_path / "run"
    make_synthetic_shards(data, n_train=64, n_test=32, image_shape=(32, 32, 3), dataset="cifar10")
    small = ["model.conv1_channels=16", "model.num_prime_capsules=4"]
    config = ["-c", "configs/cifar10.yaml", f"data.root={data}", *small]
    train = run_capsdist(
        "train", *config, f"run.dir={run}", "train.max_steps=3", "train.batch_size=8"
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert train.result["step"] == 3
    evaluation = run_capsdist("eval", *config, f"ckpt={run}")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert evaluation.result["num_examples"] == 32


def test_train_with_periodic_evaluation_draws_figures(mnist_sample, tmp_path):
    run = tmp_path / "run"
    out = run_capsdist(
        "train",
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=10",
        "train.eval_every=10",
        "eval.max_examples=100",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert 0.0 <= out.result["eval_accuracy"] <= 1.0
    figures = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert {"reconstructions.png", "perturbations.png", "confusion.png", "routing.png"} <= set(
        figures
    )
