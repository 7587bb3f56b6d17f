"""Data from anywhere: the same shards read from HTTP, S3 (moto's real S3 server), `pipe:`
commands and brace patterns, cached per node, written to S3, indexed from webdataset PNG shards,
and the failures (server gone, 404, wrong bytes, no credentials) said in one line."""

from __future__ import annotations

import functools
import io
import itertools
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from capsdist.data import DataError, ShardReader, read_meta, read_split_arrays
from capsdist.data.source import ShardTask, load
from data_tools import DataToolError, make_index, make_synthetic_shards
from tests.unit.test_data_reader import assert_same_batches, digests

N_TRAIN, PER_SHARD = 200, 25  # 8 train shards, 2 test shards
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Hermetic: no profile files of this machine, no instance-metadata lookups (1 s timeouts).
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class Handler(SimpleHTTPRequestHandler):
    """http.server's file handler, quiet, recording each GET; `server.fail_next` requests are
    answered 503 (a transient fault)."""

    def do_GET(self):
        self.server.gets.append(self.path)
        if self.server.fail_next > 0:
            self.server.fail_next -= 1
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@contextmanager
def serve_http(folder: Path) -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server (http.server's, threaded) for `folder` on 127.0.0.1; `.url`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
    server.gets, server.fail_next = [], 0
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_s3() -> Iterator[str]:
    """moto's S3 server on a free port, with the AWS variables pointing at it; its endpoint."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps one per arguments, not per endpoint
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def upload(endpoint: str, folder: Path, bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote_shards")
    make_synthetic_shards(out, n_train=N_TRAIN, n_test=50, samples_per_shard=PER_SHARD, seed=0)
    return out


@pytest.fixture(scope="module")
def http(shards):
    with serve_http(shards) as server:
        yield server


@pytest.fixture(scope="module")
def s3(shards):
    with serve_s3() as endpoint:
        upload(endpoint, shards, "bucket", "syn")
        yield endpoint


def reader(root, split="train", **kwargs) -> ShardReader:
    options = {"batch_size": 10, "shuffle_buffer": 40, **kwargs}
    return ShardReader(root, split, read_meta(root), **options)


def test_http_root_reads_exactly_what_the_folder_reads(shards, http):
    assert read_meta(http.url + "/") == read_meta(shards)
    for kwargs in ({"train": True}, {"train": False}, {"num_workers": 2}):
        assert_same_batches(reader(http.url, **kwargs).epoch(1), reader(shards, **kwargs).epoch(1))


def test_s3_ranks_read_disjoint_shards_and_resume_exactly(shards, s3):
    root = "s3://bucket/syn"
    everything = digests(reader(shards, train=False).epoch(0))
    ranks = [reader(root, rank=r, world_size=2, train=False) for r in (0, 1)]
    assert ranks[0].shards == [f"train-{i:06d}.tar" for i in (0, 2, 4, 6)]
    parts = [digests(r.epoch(0)) for r in ranks]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(everything)
    # A job killed after `start` batches and resumed reads exactly what it would have read.
    train = reader(root, rank=1, world_size=2)
    per_epoch = train.batches_per_epoch
    for start in (3, per_epoch + 2):
        expected = itertools.islice(train.batches(0), start, start + per_epoch)
        assert_same_batches(itertools.islice(train.batches(start), per_epoch), expected)
    # Resampling (fewer shards than ranks x workers) draws the same shards as from the folder.
    kwargs = {"split": "test", "world_size": 2, "num_workers": 2, "seed": 4}
    assert reader(root, **kwargs).resampled
    assert_same_batches(reader(root, **kwargs).epoch(2), reader(shards, **kwargs).epoch(2))


def test_pipe_commands_brace_patterns_and_file_urls(shards, http):
    full = digests(reader(shards, train=False).epoch(0))
    cat = f"pipe:cat {shards}/train-{{000000..000007}}.tar"
    assert digests(reader(shards, train=False, shards=cat).epoch(0)) == full
    assert digests(reader(f"file://{shards}", train=False).epoch(0)) == full
    # A pattern naming 2 of the 8 shards: this reader reads those only, from the server.
    part = reader(shards, train=False, shards=http.url + "/train-{000002..000003}.tar")
    assert part.num_examples == 2 * PER_SHARD
    assert digests(part.epoch(0)) == full[2 * PER_SHARD : 4 * PER_SHARD]
    with pytest.raises(DataError, match=r"'s3://b/other-000001.tar' reads no shard that .*meta"):
        reader(shards, shards="s3://b/other-{000001..000002}.tar")


def test_cache_dir_fetches_each_shard_once_per_node(shards, tmp_path):
    cache = tmp_path / "cache"
    with serve_http(shards) as server:
        meta = read_meta(server.url)
        task = ShardTask(f"{server.url}/test-000000.tar", 25, 25, meta["shards"]["test-000000.tar"])
        task = ShardTask(**{**task.__dict__, "cache_dir": str(cache)})
        # Four readers of one node want the same shard at once: one download, four copies.
        results = [None] * 4
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, load(task)))
            for i in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(r.data == (shards / "test-000000.tar").read_bytes() for r in results)
        assert server.gets.count("/test-000000.tar") == 1
        cached = reader(server.url, cache_dir=str(cache), num_workers=2)
        first = list(cached.epoch(0))
        assert_same_batches(cached.epoch(1), reader(shards, num_workers=2).epoch(1))
        assert_same_batches(first, reader(shards, num_workers=2).epoch(0))
        read = ["test-000000.tar"] + [f"train-{i:06d}.tar" for i in range(8)]
        assert sorted(path for path in server.gets if path.endswith(".tar")) == [
            f"/{name}" for name in read
        ]
        # A copy damaged on this disk after it was checked is fetched again, not trained on.
        copy = cache / f"{task.sha256}.tar"
        copy.write_bytes(copy.read_bytes()[:-512])
        assert load(task).data == (shards / "test-000000.tar").read_bytes()
        assert server.gets.count("/test-000000.tar") == 2
    # Named by content: a shard changed upstream is another file, never a stale hit.
    assert {p.name for p in cache.glob("*.tar")} == {f"{meta['shards'][n]}.tar" for n in read}
    assert not list(cache.glob("*.part"))  # written under temporary names, then renamed


def test_transient_errors_are_retried_then_named(shards, monkeypatch):
    monkeypatch.setenv("CAPSDIST_FETCH_RETRY_DELAY", "0.01")
    with serve_http(shards) as server:
        server.fail_next = 3  # three 503s: retried with backoff, then read
        assert read_meta(server.url)["splits"] == {"train": N_TRAIN, "test": 50}
        assert server.gets == ["/meta.json"] * 4
        train = reader(server.url, batch_size=25, shuffle_buffer=0)
        batches = train.batches()
        next(batches)
    # The server is gone mid-epoch: retried, then one line naming the URL.
    with pytest.raises(DataError) as info:
        list(itertools.islice(batches, train.batches_per_epoch))
    message = str(info.value)
    assert "\n" not in message and message.startswith(server.url + "/train-0000")
    assert "cannot read after 5 tries" in message and "check the server" in message


def test_missing_shard_is_named_or_skipped_and_counted(shards, tmp_path, s3):
    import boto3

    client = boto3.client("s3")
    for name in ["meta.json", *read_meta(shards)["shards"]]:
        if name != "train-000005.tar":
            client.copy_object(Bucket="bucket", Key=f"gaps/{name}", CopySource=f"bucket/syn/{name}")
    with pytest.raises(DataError, match=r"^s3://bucket/gaps/train-000005.tar: not found$"):
        list(reader("s3://bucket/gaps", train=False).epoch(0))
    skipping = reader("s3://bucket/gaps", train=False, on_error="skip")
    assert sum(len(b.labels) for b in skipping.epoch(0)) == N_TRAIN - PER_SHARD
    assert skipping.num_skipped == PER_SHARD
    # HTTP 404: the URL as given, and no advice to write to that read location.
    with serve_http(tmp_path) as server, pytest.raises(DataError) as info:
        read_meta(server.url + "/mnist")
    message = str(info.value)
    assert message.startswith(f"{server.url}/mnist/meta.json: not found: is data.root")
    assert f"--out {server.url}" not in message and "http:/1" not in message


def test_missing_credentials_say_which_variables(s3, monkeypatch):
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(DataError) as info:
            read_meta("s3://bucket/syn")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert str(info.value) == (
        "s3://bucket/syn/meta.json: cannot read: no S3 credentials found: set AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an S3 server "
        "other than AWS"
    )


def test_replaced_remote_shard_is_refused_without_advice_to_write_there(shards, tmp_path):
    copy = shutil.copytree(shards, tmp_path / "copy")
    shutil.copy(copy / "train-000000.tar", copy / "train-000001.tar")
    with serve_http(copy) as server, pytest.raises(DataError) as info:
        list(reader(server.url, train=False).epoch(0))
    message = str(info.value)
    assert message.startswith(f"{server.url}/train-000001.tar: sha256 ")
    assert "meta.json records" in message and "--out" not in message


def test_converter_writes_to_s3_and_refuses_other_data(shards, s3, tmp_path):
    out = "s3://bucket/written"
    summary = make_synthetic_shards(out, n_train=N_TRAIN, n_test=50, samples_per_shard=PER_SHARD)
    assert summary["out"] == out and summary["num_shards"] == 10
    assert read_meta(out) == read_meta(shards)  # the same bytes, sha256s and all
    assert_same_batches(reader(out).epoch(0), reader(shards).epoch(0))
    with pytest.raises(DataToolError, match=f"{out}: already holds data set 'mnist'"):
        make_synthetic_shards(out, dataset="smallnorb", n_train=8, n_test=8)
    with pytest.raises(DataToolError, match=f"{out}: already holds different 'mnist' data"):
        make_synthetic_shards(out, n_train=8, n_test=8, seed=3)
    assert read_meta(out)["splits"] == {"train": N_TRAIN, "test": 50}  # untouched
    assert not list(Path(tempfile.gettempdir()).glob("capsdist-upload-*"))  # staging removed


def test_index_makes_webdataset_png_shards_trainable(shards, tmp_path):
    import webdataset as wds
    from PIL import Image

    images, labels = read_split_arrays(shards, "train", read_meta(shards))
    folder = tmp_path / "png"
    folder.mkdir()
    for split, part in (("train", slice(0, 150)), ("test", slice(150, 200))):
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=40, verbose=0) as sink:
            for i in range(*part.indices(N_TRAIN)):
                png = io.BytesIO()
                Image.fromarray(images[i, :, :, 0]).save(png, format="PNG")
                sink.write(
                    {"__key__": f"digit{i:04d}", "png": png.getvalue(), "cls": int(labels[i])}
                )
    with serve_http(folder) as server:  # read once, from the server; meta.json written here
        summary = make_index(server.url, tmp_path / "index", dataset="mnist", progress=False)
        assert summary["splits"] == {"test": 50, "train": 150} and summary["num_shards"] == 6
        meta = read_meta(tmp_path / "index")
        assert meta["shard_root"] == server.url and meta["image_field"] == "png"
        assert meta["image_shape"] == [28, 28, 1] and meta["num_classes"] == 10
        got, got_labels = read_split_arrays(tmp_path / "index", "train", meta)
        batch = next(reader(tmp_path / "index", num_workers=2).epoch(0))
    np.testing.assert_array_equal(got, images[:150])
    np.testing.assert_array_equal(got_labels, labels[:150])
    assert batch.images.shape == (10, 1, 28, 28) and batch.labels.dtype == torch.int64
    with pytest.raises(DataToolError, match="shard names must be SPLIT-NNNNNN.tar"):
        (folder / "extra.tar").write_bytes(b"")
        make_index(str(folder), tmp_path / "again", dataset="mnist", progress=False)
