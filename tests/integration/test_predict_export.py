"""After training (issue 16): `capsdist predict` on image files written from real shards agrees
with evaluation; `capsdist export` (ONNX through onnxruntime, torch.export .pt2) matches eager
evaluation for MNIST, MultiMNIST and CIFAR-10 shapes; the weights reach W&B as model artifacts,
and eval / validate runs are logged, all offline (the run files are read back, no network)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsdist.config import config_to_yaml, load_config
from capsdist.data import read_meta
from capsdist.eval import build_eval_reader, evaluate, load_model
from capsdist.models import build_model
from capsdist.run_dir import export_weights
from capsdist.serve import export as export_module
from capsdist.serve import load_serving_config, run_export
from capsdist.serve.inputs import first_images
from data_tools.synthetic import make_synthetic_shards
from tests.conftest import ROOT, run_capsdist

pytestmark = pytest.mark.slow

DEBUG = ["-c", "configs/debug_cpu.yaml"]
NUM_PNG = 100
# Tiny versions of the shipped models: parity does not need trained or large weights.
TINY = ["model.conv1_channels=8", "model.num_prime_capsules=2", "model.decoder_hidden=[16,32]"]


@pytest.fixture(scope="module")
def wandb_data(tmp_path_factory) -> Path:
    """Where offline W&B stages artifact files (instead of ~/.local/share/wandb)."""
    return tmp_path_factory.mktemp("wandb_data")


@pytest.fixture(scope="module")
def trained(mnist_sample, tmp_path_factory, wandb_data) -> Path:
    """A debug CapsNet trained 30 steps on the real digits, logging to W&B offline."""
    run = tmp_path_factory.mktemp("predict") / "run"
    out = run_capsdist(
        "train",
        *DEBUG,
        f"data.root={mnist_sample}",
        f"run.dir={run}",
        "train.max_steps=30",
        "wandb.mode=offline",
        WANDB_MODE="offline",
        WANDB_DATA_DIR=str(wandb_data),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def digits(mnist_sample, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The first NUM_PNG test digits as PNG files (and their pixels), plus a file that is not
    an image and a text file that a folder listing leaves out."""
    folder = tmp_path_factory.mktemp("digits")
    pixels = first_images(str(mnist_sample), read_meta(mnist_sample), "test", NUM_PNG)
    for i, image in enumerate(pixels):
        Image.fromarray(image[:, :, 0]).save(folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    (folder / "notes.txt").write_text("not an input")
    return folder, pixels


def eval_predictions(mnist_sample: Path, weights: Path, n: int) -> tuple[list[int], float]:
    """Each of the first n test images' class and the accuracy, as `capsdist eval` computes
    them (its reader, its model loading)."""
    cfg = load_config(["configs/debug_cpu.yaml"], [f"data.root={mnist_sample}"])
    cfg.eval.max_examples = n
    model = load_model(weights, cfg, torch.device("cpu"))
    reader = build_eval_reader(cfg, read_meta(mnist_sample), torch.device("cpu"))
    with torch.no_grad():
        classes = [int(c) for b in reader.epoch(0) for c in model(b.images).lengths.argmax(1)]
    return classes, evaluate(model, reader, cfg)["accuracy"]


def prediction_lines(stdout: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in stdout.strip().splitlines()]
    return {Path(line["path"]).name: line for line in lines[:-1]}


def test_predict_on_png_files_agrees_with_eval(trained, digits, mnist_sample, tmp_path):
    folder, _ = digits
    out = run_capsdist("predict", f"ckpt={trained}", folder, "--recon", tmp_path / "recon")
    assert out.returncode == 1, out.stderr[-3000:]  # the broken file: non-zero at the end
    lines = prediction_lines(out.stdout)
    assert "notes.txt" not in lines and "left out 1 file(s)" in out.stderr
    assert lines["broken.png"] == {
        "path": str(folder / "broken.png"),
        "error": "not an image file (PNG, JPEG, BMP, GIF, WebP, PPM/PGM, TIFF) nor a .npy array",
    }
    assert out.result["num_predicted"] == NUM_PNG and out.result["num_failed"] == 1
    assert "could not be predicted" in out.stderr

    expected, accuracy = eval_predictions(mnist_sample, trained / "model.safetensors", NUM_PNG)
    labels = read_labels(mnist_sample, NUM_PNG)
    predicted = [lines[f"{i:03d}.png"]["class"] for i in range(NUM_PNG)]
    assert predicted == expected
    assert np.mean(np.array(predicted) == labels) == pytest.approx(accuracy)
    first = lines["000.png"]
    assert len(first["lengths"]) == 10
    assert first["confidence"] == max(first["lengths"]) > 0
    recon = Image.open(first["recon"])
    assert recon.size == (4 * (2 * 28 + 4), 4 * 28)  # input | reconstruction, 4x (112 px high)


def read_labels(root: Path, n: int) -> np.ndarray:
    from capsdist.serve.inputs import shard_items

    items = list(shard_items(str(root), read_meta(root), "test", max_examples=n))
    return np.array([item.label[0] for item in items])


def test_invert_and_resize(trained, digits, tmp_path):
    """Black-on-white inputs with --invert give the very lengths of the originals; inputs of
    another size are resized, with a warning and `resized_from`."""
    folder, pixels = digits
    inverted, larger = tmp_path / "inverted", tmp_path / "larger"
    inverted.mkdir()
    larger.mkdir()
    for i, image in enumerate(pixels[:10]):
        Image.fromarray(255 - image[:, :, 0]).convert("RGB").save(inverted / f"{i:03d}.png")
        big = Image.fromarray(image[:, :, 0]).resize((56, 56), Image.Resampling.NEAREST)
        big.save(larger / f"{i:03d}.png")
    originals = [folder / f"{i:03d}.png" for i in range(10)]
    plain = prediction_lines(run_capsdist("predict", f"ckpt={trained}", *originals).stdout)
    out = run_capsdist("predict", f"ckpt={trained}", inverted, "--invert")
    assert out.returncode == 0, out.stderr[-3000:]
    for name, line in prediction_lines(out.stdout).items():
        assert line["lengths"] == plain[name]["lengths"], name

    out = run_capsdist("predict", f"ckpt={trained}", larger)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resizing 56x56 images to 28x28" in out.stderr
    resized = prediction_lines(out.stdout)
    assert all(line["resized_from"] == [56, 56] for line in resized.values())
    same = sum(resized[name]["class"] == plain[name]["class"] for name in plain)
    assert same >= 8  # a 2x nearest upscale, shrunk back with antialiasing: nearly the same


def test_onnx_export_of_the_trained_model_matches_eval(trained, mnist_sample, tmp_path):
    out = run_capsdist(
        "export", f"ckpt={trained}", "--format", "onnx", "--out", tmp_path / "capsnet.onnx"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = out.result
    assert result["max_abs_diff"] <= 1e-4 and result["classes_agree"] == "64/64"
    assert result["parity_images"] == f"the first 64 of {mnist_sample} split test"
    assert result["outputs"] == ["lengths", "reconstruction"] and result["opset"] >= 17
    assert (tmp_path / "capsnet.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["capsnet.onnx"]  # no temporary file left

    import onnx

    graph = onnx.load(str(tmp_path / "capsnet.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert graph.input[0].name == "images" and dims[0].dim_param  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]


def tiny_weights(tmp_path: Path, config: str, data: Path, *overrides: str) -> Path:
    """Randomly initialised weights of a tiny version of a shipped config, saved as training
    saves them (config in the metadata)."""
    cfg = load_config([config], [*TINY, f"data.root={data}", *overrides])
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    export_weights(build_model(cfg.model).state_dict(), config_to_yaml(cfg), path)
    return path


@pytest.mark.parametrize(
    "config, shards",
    [
        ("configs/multimnist.yaml", {"image_shape": (36, 36, 1), "num_targets": 2}),
        # 32x32 shards for a 24x24 model with per-image standardisation: the crop happens
        # outside the graph, the standardisation inside it.
        ("configs/cifar10.yaml", {"image_shape": (32, 32, 3)}),
    ],
    ids=["multimnist", "cifar10"],
)
def test_onnx_parity_for_other_shapes(config, shards, tmp_path):
    data = tmp_path / "data"
    dataset = Path(config).stem
    make_synthetic_shards(data, n_train=8, n_test=16, dataset=dataset, **shards)
    weights = tiny_weights(tmp_path, config, data)
    cfg, _ = load_serving_config([], [f"ckpt={weights}"])
    result = run_export(cfg, weights, "onnx", str(tmp_path / "model.onnx"), num_examples=16)
    assert "error" not in result
    assert result["max_abs_diff"] <= 1e-4 and result["classes_agree"] == "16/16"
    assert result["parity_images"].startswith("the first 16 of")
    h, w, c = cfg.model.image_shape
    assert result["input"]["shape"] == ["N", c, h, w]
    assert result["standardize_in_graph"] is cfg.data.standardize

    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    outputs = session.run(None, {"images": np.random.rand(3, c, h, w).astype(np.float32)})
    assert outputs[0].shape == (3, 10)
    if cfg.model.num_targets == 2:  # one reconstruction per predicted digit
        assert outputs[1].shape == (3, 2, c, h, w)


def test_pt2_export_parity_and_refusal(trained, tmp_path, monkeypatch):
    cfg, weights = load_serving_config([], [f"ckpt={trained}", "data.root=''"])  # random images
    result = run_export(cfg, weights, "pt2", str(tmp_path / "model.pt2"), num_examples=8)
    assert result["max_abs_diff"] <= 1e-4 and result["parity_images"] == "random"
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        lengths, recon = program(images)
        eager = load_model(weights, cfg, torch.device("cpu"))(images)
    torch.testing.assert_close(lengths, eager.lengths, atol=1e-4, rtol=0)
    assert recon.shape == (5, 1, 28, 28)

    # A file that does not match eager evaluation is not kept, and the command fails.
    monkeypatch.setattr(export_module, "TOLERANCE", 0.0)
    refused = run_export(cfg, weights, "pt2", str(tmp_path / "refused.pt2"), num_examples=8)
    assert "parity check failed" in refused["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


# ---- W&B, offline -------------------------------------------------------------------------------


def wandb_records(run_file: Path) -> list:
    """The records of an offline run file (`run-ID.wandb`): W&B's header, then LevelDB log
    blocks of 32 KiB holding protobuf Records (full, or first/middle/last fragments)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    records, pos, fragments, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        fragments += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(fragments)
            records.append(record)
            fragments = b""
    return records


def offline_runs(run_dir: Path) -> dict[str, list]:
    """job_type → records of each offline run in run_dir/wandb."""
    runs = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        records = wandb_records(path)
        job = next(r.run.job_type for r in records if r.WhichOneof("record_type") == "run")
        runs[job] = records
    return runs


def artifacts(records: list) -> list:
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]


def sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_weights_are_wandb_model_artifacts_and_eval_runs_are_logged(
    trained, mnist_sample, wandb_data
):
    env = {"WANDB_MODE": "offline", "WANDB_DATA_DIR": str(wandb_data)}
    common = [*DEBUG, f"data.root={mnist_sample}", "wandb.mode=offline", "eval.max_examples=100"]
    evaluation = run_capsdist("eval", *common, f"ckpt={trained}", **env)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    validation = run_capsdist(
        "validate", *common, f"run.dir={trained}", "validate.poll_s=0.1", **env
    )
    assert validation.returncode == 0, validation.stderr[-3000:]

    runs = offline_runs(trained)
    assert {"train", "eval", "validate"} <= set(runs)
    (final,) = artifacts(runs["train"])
    assert (final.type, final.name) == ("model", f"model-{trained.name}")
    assert {"final", "step-30"} <= set(final.aliases)
    metadata = json.loads(final.metadata)
    assert metadata["step"] == 30 and 0 <= metadata["train_accuracy"] <= 1
    assert metadata["config"]["model"]["conv1_channels"] == 16
    (entry,) = final.manifest.contents
    assert entry.path == "model.safetensors"
    assert sha256(entry.local_path) == sha256(trained / "model.safetensors")  # staged copy
    assert Path(entry.local_path).is_relative_to(wandb_data)

    (best,) = artifacts(runs["validate"])
    assert best.name == final.name and "best" in best.aliases
    record = json.loads((trained / "validation.json").read_text())
    assert json.loads(best.metadata)["accuracy"] == record["best_accuracy"]
    assert sha256(best.manifest.contents[0].local_path) == sha256(trained / "best.safetensors")

    summary = next(r.summary for r in runs["eval"] if r.WhichOneof("record_type") == "summary")
    values = {item.key: json.loads(item.value_json) for item in summary.update}
    assert values["accuracy"] == evaluation.result["accuracy"]


def test_version_and_keys_on_stdout():
    version = run_capsdist("--version")
    assert version.returncode == 0
    pyproject = (ROOT / "pyproject.toml").read_text()
    number = version.stdout.split()[1]
    assert f'version = "{number}"' in pyproject and "torch 2." in version.stdout
    keys = run_capsdist("keys")
    assert keys.returncode == 0
    assert "model.routing_iters = 3" in keys.stdout and keys.stderr == ""
    assert keys.result["num_keys"] == keys.stdout.count("\n    ")


def test_predict_two_targets_from_a_shard_folder(tmp_path, capsys):
    """Shards as input: each sample named SHARD#KEY with its labels; a two-target model gives
    two classes and two confidences per image, and the summary the accuracy over the labels."""
    from capsdist.serve import run_predict

    data = tmp_path / "data"
    make_synthetic_shards(
        data, n_train=8, n_test=12, image_shape=(36, 36, 1), num_targets=2, dataset="multimnist"
    )
    weights = tiny_weights(tmp_path, "configs/multimnist.yaml", data)
    cfg, _ = load_serving_config([], [f"ckpt={weights}"])
    summary = run_predict(cfg, weights, [str(data)], batch_size=5)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 12 and summary["num_predicted"] == 12
    for line in lines:
        assert "#" in line["path"] and line["path"].split("#")[0].endswith(".tar")
        assert len(line["class"]) == len(line["confidence"]) == len(line["label"]) == 2
        assert line["class"] == sorted(line["class"]) and len(line["lengths"]) == 10
    correct = sum(sorted(line["class"]) == sorted(line["label"]) for line in lines)
    assert summary["accuracy"] == correct / 12
