"""The data experiments end to end through the CLI: bench data, MultiMNIST, affNIST eval."""

from __future__ import annotations

import pytest

from data_tools import make_affnist_like, make_expanded_mnist, make_multimnist
from tests.conftest import run_capsdist

pytestmark = pytest.mark.slow

TINY = ["-c", "configs/debug_cpu.yaml", "train.max_steps=6", "train.log_every=2"]


def test_bench_data_ends_with_samples_per_s(mnist_sample):
    out = run_capsdist("bench", "data", f"data.root={mnist_sample}", "train.time_limit_s=1")
    assert out.returncode == 0, out.stderr[-2000:]
    result = out.result
    assert result["samples_per_s"] > 0 and result["samples"] >= result["batch_size"]
    assert result["num_workers"] == 0 and result["augmentation"] == {"shift_pixels": 2}
    assert "bench data" in out.stderr  # the progress bar


def test_multimnist_trains_with_two_targets_and_recon_per_digit(mnist_sample, tmp_path):
    make_multimnist(mnist_sample, tmp_path / "mm", pairs=1, progress=False)
    model = ["data.dataset=multimnist", "model.image_shape=[36,36,1]", "model.num_targets=2"]
    run = tmp_path / "run"
    out = run_capsdist("train", *TINY, f"data.root={tmp_path}/mm", *model, f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.result["step"] == 6 and out.result["loss"] > 0
    ev = run_capsdist(
        "eval", *TINY, f"data.root={tmp_path}/mm", *model, f"ckpt={run}", "eval.max_examples=200"
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert ev.result["num_examples"] == 200 and ev.result["data_skipped"] == 0


def test_affnist_experiment_reports_both_accuracies(mnist_sample, tmp_path):
    make_expanded_mnist(mnist_sample, tmp_path / "expanded_mnist", progress=False)
    make_affnist_like(mnist_sample, tmp_path / "affnist_like", progress=False)
    common = [
        "-c",
        "configs/debug_cpu.yaml",
        "-c",
        "configs/affnist.yaml",
        # debug_cpu's tiny model again, which affnist.yaml (loaded last) set back to the paper's
        "model.num_prime_capsules=4",
        "model.conv1_channels=16",
        "model.decoder_hidden=[64,128]",
        "train.batch_size=32",
        "train.max_steps=4",
        "train.log_every=2",
        "wandb.mode=disabled",
        f"data.root={tmp_path}/expanded_mnist",
        f"data.extra_eval_roots=[{tmp_path}/affnist_like]",
        "eval.max_examples=100",
    ]
    run = tmp_path / "run"
    out = run_capsdist("train", *common, f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    ev = run_capsdist("eval", *common, f"ckpt={run}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = ev.result
    assert result["num_examples"] == 100
    assert result["extra_eval"]["affnist_like"]["num_examples"] == 100
    assert 0 <= result["affnist_like_accuracy"] <= 1


def test_cifar_shaped_shards_feed_a_24x24_model_through_the_config(tmp_path):
    from capsdist.config import load_config
    from capsdist.data import build_reader, check_data_matches_model, read_meta
    from data_tools import make_synthetic_shards

    make_synthetic_shards(
        tmp_path / "c", n_train=64, n_test=20, image_shape=(32, 32, 3), dataset="cifar10"
    )
    cfg = load_config(["configs/cifar10.yaml"], [f"data.root={tmp_path}/c"])
    meta = read_meta(cfg.data.root)
    check_data_matches_model(meta, cfg)  # 32x32 shards, 24x24 model: fine
    train = build_reader(cfg, "train", meta, train=True, batch_size=16)
    x, y, _ = next(train.epoch(0))
    assert x.shape == (16, 3, 24, 24) and abs(float(x.mean())) < 1e-3  # standardised
    test = build_reader(cfg, "test", meta, train=False, batch_size=20)
    first, second = next(test.epoch(0)).images, next(test.epoch(0)).images
    assert first.shape == (20, 3, 24, 24) and first.equal(second)  # centre crop: fixed
    small = load_config(
        ["configs/cifar10.yaml"], [f"data.root={tmp_path}/c", "model.image_shape=[40,40,3]"]
    )
    with pytest.raises(Exception, match="can only crop"):
        check_data_matches_model(meta, small)
