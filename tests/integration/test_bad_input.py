"""Bad input: one-line error naming the file or key, non-zero exit, nothing overwritten."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

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
    # .lock names the last job that held run.dir (the refused one too): it is no result.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    out = run_capsdist(
        "train",
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "model.num_prime_capsules=8",
        "train.max_steps=8",
    )
    assert_one_line_error(out, str(run / "checkpoints"), "model.num_prime_capsules")
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before

    other = run_capsdist(
        "eval", *DEBUG, f"data.root={mnist_sample}", f"ckpt={run}", "model.num_prime_capsules=8"
    )
    assert_one_line_error(other, "model.safetensors", "model.num_prime_capsules")


def test_missing_data_root_says_what_to_run(tmp_path):
    out = run_capsdist("train", *DEBUG, f"data.root={tmp_path}/none", f"run.dir={tmp_path}/run")
    assert_one_line_error(out, "meta.json", "capsdist data")


def untrained_weights(path: Path) -> Path:
    """debug_cpu's model, freshly initialised, exported as `capsdist train` exports it."""
    from capsdist.config import config_to_yaml, load_config
    from capsdist.models import build_model
    from capsdist.run_dir import export_weights

    cfg = load_config(["configs/debug_cpu.yaml"])
    path.parent.mkdir(parents=True, exist_ok=True)
    export_weights(build_model(cfg.model).state_dict(), config_to_yaml(cfg), path)
    return path


@pytest.mark.parametrize("below", ["", "sub"], ids=["is-a-file", "under-a-file"])
def test_run_dir_that_is_a_file_or_under_one(mnist_sample, tmp_path, below):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    run = a_file / below if below else a_file
    out = run_capsdist("train", *DEBUG, f"data.root={mnist_sample}", f"run.dir={run}")
    assert_one_line_error(out, f"run.dir {run}", f"{a_file} is a file")
    assert a_file.read_text() == "mine\n"


def test_truncated_safetensors(mnist_sample, tmp_path):
    weights = untrained_weights(tmp_path / "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:5000])
    out = run_capsdist("eval", *DEBUG, f"data.root={mnist_sample}", f"ckpt={weights}")
    assert_one_line_error(out, str(weights), "not a readable safetensors file")


def test_eval_of_zero_examples_is_an_error_and_writes_nothing(tmp_path):
    """Every test sample is bad and data.on_error=skip: no score, and eval.json is kept."""
    from data_tools.synthetic import make_synthetic_shards

    data = tmp_path / "data"
    make_synthetic_shards(data, n_train=64, n_test=5)
    shard = data / "test-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            if member.name.endswith(".img.u8"):  # 7 bytes where 784 belong
                payload, member.size = payload[:7], 7
            tar.addfile(member, io.BytesIO(payload))
    meta = json.loads((data / "meta.json").read_text())
    meta["shards"][shard.name] = hashlib.sha256(shard.read_bytes()).hexdigest()  # bad, not forged
    (data / "meta.json").write_text(json.dumps(meta))
    weights = untrained_weights(tmp_path / "run" / "model.safetensors")
    (weights.parent / "eval.json").write_text("{}\n")

    out = run_capsdist("eval", *DEBUG, f"data.root={data}", "data.on_error=skip", f"ckpt={weights}")
    assert_one_line_error(out, str(data))
    assert (weights.parent / "eval.json").read_text() == "{}\n"


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB file system (tmpfs) at tmp_path/disk: room for one checkpoint of debug_cpu's
    model (8.2 MB with its whole-optimizer copy) and its exported weights, not for two.
    Mounting one needs root (CAP_SYS_ADMIN): elsewhere the tests that use it are skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_full_disk_keeps_the_last_checkpoint_and_says_so(mnist_sample, small_disk):
    run = small_disk / "run"
    out = run_capsdist(
        "train",
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=4",
        "train.checkpoint_every=2",
    )
    assert_one_line_error(out, f"run.dir {run}", "disk is full", "rerun to resume")
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step000000002"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step000000002"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 2 and "disk is full" in status["error"]


def test_read_only_run_dir(mnist_sample, small_disk):
    """Training there is refused before it starts; evaluating its weights works, and says
    that eval.json could not be written."""
    run = small_disk / "run"
    config = [*DEBUG, f"data.root={mnist_sample}", f"run.dir={run}"]
    assert run_capsdist("train", *config, "train.max_steps=2").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

    more = run_capsdist("train", *config, "train.max_steps=4")
    assert_one_line_error(more, f"run.dir {run}", "Read-only file system")
    evaluation = run_capsdist("eval", *config, f"ckpt={run}")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert evaluation.result["num_examples"] == 1000
    assert f"{run / 'eval.json'} not written (Read-only file system)" in evaluation.stderr
