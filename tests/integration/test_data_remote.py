"""`capsdist train / eval / bench data` on shards in object storage and behind HTTP, and on
webdataset PNG shards made trainable by `capsdist data index`, through the CLI as users run it."""

from __future__ import annotations

import io

import pytest

from capsdist.data import read_meta, read_split_arrays
from tests.conftest import run_capsdist
from tests.unit.test_data_remote import serve_http, serve_s3, upload

pytestmark = pytest.mark.slow

DEBUG = ["-c", "configs/debug_cpu.yaml", "train.log_every=5"]


def test_train_from_s3_then_eval_and_bench_over_http(mnist_sample, tmp_path):
    run = tmp_path / "run"
    with serve_s3() as endpoint:  # AWS_ENDPOINT_URL and credentials set, as a user would
        upload(endpoint, mnist_sample, "bucket", "mnist")
        out = run_capsdist(
            "train", *DEBUG, "data.root=s3://bucket/mnist", "train.max_steps=20", f"run.dir={run}"
        )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.result["step"] == 20 and out.result["loss"] > 0
    with serve_http(mnist_sample) as server:
        ev = run_capsdist(
            "eval", *DEBUG, f"data.root={server.url}/", f"ckpt={run}", "eval.max_examples=200"
        )
        bench = run_capsdist("bench", "data", f"data.root={server.url}", "train.time_limit_s=1")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert ev.result["num_examples"] == 200 and ev.result["data_skipped"] == 0
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert bench.result["samples_per_s"] > 0


def test_webdataset_png_shards_index_then_train(mnist_sample, tmp_path):
    import webdataset as wds
    from PIL import Image

    images, labels = read_split_arrays(mnist_sample, "train", read_meta(mnist_sample))
    folder = tmp_path / "png"
    folder.mkdir()
    for split, (start, stop) in (("train", (0, 600)), ("test", (600, 800))):
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=200, verbose=0) as sink:
            for i in range(start, stop):
                png = io.BytesIO()
                Image.fromarray(images[i, :, :, 0]).save(png, format="PNG")
                sink.write({"__key__": f"{i:05d}", "png": png.getvalue(), "cls": int(labels[i])})
    index = run_capsdist("data", "index", folder, "--out", tmp_path / "meta", "--dataset", "mnist")
    assert index.returncode == 0, index.stderr[-2000:]
    assert index.result["splits"] == {"test": 200, "train": 600}
    out = run_capsdist(
        "train", *DEBUG, f"data.root={tmp_path / 'meta'}", "train.max_steps=6",
        f"run.dir={tmp_path / 'run'}", "data.num_workers=2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.result["step"] == 6
