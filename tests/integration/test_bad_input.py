"""Bad input: one-line error naming the file or key, non-zero exit, nothing overwritten."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import run_capsdist

pytestmark = pytest.mark.slow

DEBUG = ["-c", "configs/debug_cpu.yaml"]


def assert_one_line_error(out, *fragments: str) -> None:
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("capsdist ") and "error:" in message, out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in out.stderr


def test_unknown_config_key(tmp_path):
    out = run_capsdist("train", *DEBUG, "model.routing_iter=2", f"run.dir={tmp_path}/run")
    assert_one_line_error(out, "model.routing_iter", "model.routing_iters")
    assert not (tmp_path / "run").exists()


def test_file_that_is_not_idx(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (src / name).write_text("this is not an IDX file\n")
    out = run_capsdist("data", "mnist", "--src", src, "--out", tmp_path / "out")
    assert_one_line_error(out, "idx")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_truncated_shard(mnist_sample, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mnist_sample, data)
    shard = data / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:300_000])
    out = run_capsdist(
        "train", *DEBUG, f"data.root={data}", f"run.dir={tmp_path}/run", "train.max_steps=200"
    )
    assert_one_line_error(out, "train-000000.tar")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_checkpoint_path_that_does_not_exist(mnist_sample, tmp_path):
    out = run_capsdist("eval", *DEBUG, f"data.root={mnist_sample}", f"ckpt={tmp_path}/nope")
    assert_one_line_error(out, f"{tmp_path}/nope")


def test_run_dir_with_another_models_checkpoint(mnist_sample, tmp_path):
    run = tmp_path / "run"
    first = run_capsdist(
        "train",
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=4",
        "train.checkpoint_every=2",
    )
    assert first.returncode == 0, first.stderr
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    out = run_capsdist(
        "train",
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "model.num_prime_capsules=8",
        "train.max_steps=8",
    )
    assert_one_line_error(out, str(run / "checkpoints"), "model.num_prime_capsules")
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before

    other = run_capsdist(
        "eval", *DEBUG, f"data.root={mnist_sample}", f"ckpt={run}", "model.num_prime_capsules=8"
    )
    assert_one_line_error(other, "model.safetensors", "model.num_prime_capsules")


def test_missing_data_root_says_what_to_run(tmp_path):
    out = run_capsdist("train", *DEBUG, f"data.root={tmp_path}/none", f"run.dir={tmp_path}/run")
    assert_one_line_error(out, "meta.json", "capsdist data")
