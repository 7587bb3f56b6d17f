"""MNIST IDX files → shards → ShardReader, on small files written in the real IDX format."""

import gzip

import numpy as np
import pytest
import torch

from capsdist.data import ShardReader, read_meta
from data_tools import DataToolError, make_mnist
from data_tools.formats import IMAGES_MAGIC, LABELS_MAGIC, read_idx


def write_idx(path, array, magic, gz=False):
    """Write `array` (uint8) as an IDX file: magic, big-endian dims, raw bytes."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(src, rng, n_train=50, n_test=20, gz=False):
    """Four small IDX files named as MNIST's; returns {split: (images, labels)}."""
    src.mkdir(exist_ok=True)
    splits = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(src / f"{prefix}-images-idx3-ubyte", images, IMAGES_MAGIC, gz)
        write_idx(src / f"{prefix}-labels-idx1-ubyte", labels, LABELS_MAGIC, gz)
        splits[split] = (images, labels)
    return splits


def read_all(root, split, batch_size=7):
    """Every sample of a split in file order, via the eval reader → uint8 (N, H, W), labels."""
    reader = ShardReader(root, split, read_meta(root), batch_size=batch_size, train=False)
    images, labels, _ = zip(*reader.epoch(0), strict=True)
    pixels = torch.cat(images).mul(255).round().to(torch.uint8)[:, 0]  # (N, H, W)
    return pixels.numpy(), torch.cat(labels).numpy()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_through_reader(tmp_path, gz):
    splits = write_mnist(tmp_path / "src", np.random.default_rng(0), gz=gz)
    summary = make_mnist(tmp_path / "src", tmp_path / "out", samples_per_shard=16, progress=False)
    assert summary["splits"] == {"train": 50, "test": 20}
    for split, (images, labels) in splits.items():
        pixels, got_labels = read_all(tmp_path / "out", split)
        np.testing.assert_array_equal(pixels, images)
        np.testing.assert_array_equal(got_labels, labels)


def test_not_an_idx_file_is_named(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0))
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(DataToolError, match="magic number") as info:
        make_mnist(tmp_path, tmp_path / "out", progress=False)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_file_is_named(tmp_path, gz):
    write_mnist(tmp_path, np.random.default_rng(0), gz=gz)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataToolError) as info:
        make_mnist(tmp_path, tmp_path / "out", progress=False)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_labels_file_read_as_images_is_refused(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(10, dtype=np.uint8), LABELS_MAGIC)
    np.testing.assert_array_equal(read_idx(path, LABELS_MAGIC), np.arange(10))
    with pytest.raises(DataToolError, match="0x00000801, expected 0x00000803"):
        read_idx(path, IMAGES_MAGIC)


def test_label_count_must_match_image_count(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(49, np.uint8), LABELS_MAGIC)
    with pytest.raises(DataToolError, match="49 labels but train-images-idx3-ubyte holds 50"):
        make_mnist(tmp_path, tmp_path / "out", progress=False)


def test_missing_file_names_folder_and_file(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataToolError, match="t10k-labels-idx1-ubyte") as info:
        make_mnist(tmp_path, tmp_path / "out", progress=False)
    assert str(tmp_path) in str(info.value)
