"""Every converter on small files written here in the real formats, read back through the reader."""

import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from capsdist.data import ShardReader, read_meta, read_split_arrays
from data_tools import (
    DataToolError,
    make_affnist,
    make_affnist_like,
    make_cifar10,
    make_expanded_mnist,
    make_fashion_mnist,
    make_multimnist,
    make_smallnorb,
)
from data_tools.shards import write_array_dataset
from tests.unit.test_data_idx import write_mnist


def load_split(root, split, dataset="mnist"):
    """(uint8 images, labels, meta) of a converted split, read back through capsdist.data."""
    meta = read_meta(root)
    assert meta["dataset"] == dataset and meta["num_targets"] == 1
    return (*read_split_arrays(root, split, meta), meta)


def test_fashion_mnist_idx_files(tmp_path):
    splits = write_mnist(tmp_path / "src", np.random.default_rng(0), n_train=30, n_test=10)
    make_fashion_mnist(tmp_path / "src", tmp_path / "out", progress=False)
    images, labels, meta = load_split(tmp_path / "out", "train", dataset="fashion_mnist")
    assert meta["dataset"] == "fashion_mnist" and meta["image_shape"] == [28, 28, 1]
    np.testing.assert_array_equal(images[..., 0], splits["train"][0])
    np.testing.assert_array_equal(labels, splits["train"][1])


def _cifar_batches(rng, n):
    """n CIFAR records: labels and (n, 3072) pixels in channel-major order, + expected HWC."""
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    chw = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)
    return labels, chw, hwc


@pytest.mark.parametrize("version", ["binary_targz", "python_folder"])
def test_cifar10_binary_and_python_versions(tmp_path, version):
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = tmp_path / (
        "cifar-10-batches-bin" if version == "binary_targz" else "cifar-10-batches-py"
    )
    folder.mkdir()
    expected = {"train": [], "test": []}
    for name in names:
        labels, chw, hwc = _cifar_batches(rng, 4)
        expected["test" if name == "test_batch" else "train"].append((hwc, labels))
        if version == "binary_targz":
            records = np.concatenate([labels[:, None], chw], 1)
            (folder / f"{name}.bin").write_bytes(records.tobytes())
        else:
            data = {b"data": chw, b"labels": labels.tolist(), b"batch_label": b"x"}
            (folder / name).write_bytes(pickle.dumps(data, protocol=2))
    src = folder.parent
    if version == "binary_targz":
        src = tmp_path / "cifar-10-binary.tar.gz"
        with tarfile.open(src, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
    make_cifar10(src, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob(".extract-*"))  # scratch removed
    for split in ("train", "test"):
        images, labels, meta = load_split(tmp_path / "out", split, dataset="cifar10")
        np.testing.assert_array_equal(images, np.concatenate([e[0] for e in expected[split]]))
        np.testing.assert_array_equal(labels, np.concatenate([e[1] for e in expected[split]]))
    assert meta["splits"] == {"train": 20, "test": 4} and meta["image_shape"] == [32, 32, 3]


def test_cifar10_python_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataToolError, match="data_batch_1: not a CIFAR-10 python batch.*refusing"):
        make_cifar10(tmp_path, tmp_path / "out", progress=False)


def _norb_matrix(array, magic):
    dims = list(array.shape) + [1] * (3 - array.ndim)
    header = np.array([magic, array.ndim, *dims], dtype="<i4").tobytes()
    return header + array.tobytes()


def test_smallnorb_binary_matrices_are_downsampled_to_48x48x2(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for split, stem in (
        ("train", "smallnorb-5x46789x9x18x6x2x96x96-training"),
        ("test", "smallnorb-5x01235x9x18x6x2x96x96-testing"),
    ):
        pairs = rng.integers(0, 256, (6, 2, 96, 96), dtype=np.uint8)
        cats = rng.integers(0, 5, 6).astype("<i4")
        (src / f"{stem}-dat.mat").write_bytes(_norb_matrix(pairs, 0x1E3D4C55))
        (src / f"{stem}-cat.mat").write_bytes(_norb_matrix(cats, 0x1E3D4C54))
        expected[split] = (pairs, cats)
    make_smallnorb(src, tmp_path / "out", progress=False)
    images, labels, meta = load_split(tmp_path / "out", "test", dataset="smallnorb")
    pairs, cats = expected["test"]
    assert images.shape == (6, 48, 48, 2) and meta["num_classes"] == 5
    block = pairs[2, 1, 10:12, 20:22].astype(float).mean()  # view 1, output pixel (5, 10)
    assert abs(int(images[2, 5, 10, 1]) - block) <= 0.5
    np.testing.assert_array_equal(labels, cats)
    (src / "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat").write_bytes(b"\x00" * 30)
    with pytest.raises(DataToolError, match="testing-cat.mat: not a NORB"):
        make_smallnorb(src, tmp_path / "out2", progress=False)


def test_affnist_mat_file_zipped(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 40, 40), dtype=np.uint8)
    labels = rng.integers(0, 10, 7)
    columns = images.reshape(7, 1600).T  # one row-major image per column, as affNIST
    savemat(tmp_path / "test.mat", {"affNISTdata": {"image": columns, "label_int": labels}})
    with zipfile.ZipFile(tmp_path / "test.mat.zip", "w") as z:
        z.write(tmp_path / "test.mat", "test.mat")
    make_affnist(tmp_path / "test.mat.zip", tmp_path / "out", progress=False)
    got, got_labels, meta = load_split(tmp_path / "out", "test", dataset="affnist")
    np.testing.assert_array_equal(got[..., 0], images)
    np.testing.assert_array_equal(got_labels, labels)
    assert meta["splits"] == {"test": 7}


@pytest.fixture(scope="module")
def marked_mnist(tmp_path_factory):
    """MNIST-shaped shards whose image i is one 2x2 block of value 10 + i at a known spot."""
    root = tmp_path_factory.mktemp("marked")
    rng = np.random.default_rng(0)
    splits, spots = {}, {}
    for split, n in (("train", 60), ("test", 30)):
        images = np.zeros((n, 28, 28, 1), dtype=np.uint8)
        where = rng.integers(8, 19, (n, 2))
        for i, (y, x) in enumerate(where):
            images[i, y : y + 2, x : x + 2] = 10 + i
        splits[split] = (images, np.arange(n) % 10)
        spots[split] = where
    write_array_dataset(root, dataset="mnist", splits=splits, num_classes=10, progress=False)
    return root, spots


def _locate(image):
    """(value, top-left (y, x)) of the single block in a 2-D image."""
    ys, xs = np.nonzero(image)
    return int(image[ys[0], xs[0]]), np.array([ys.min(), xs.min()])


def test_multimnist_pairs_are_36x36_two_classes_shifts_within_6(marked_mnist, tmp_path):
    root, spots = marked_mnist
    make_multimnist(
        root, tmp_path / "mm", shift=6, pad=4, pairs=3, samples_per_shard=50, progress=False
    )
    meta = read_meta(tmp_path / "mm")
    assert meta["image_shape"] == [36, 36, 1] and meta["recon_shape"] == [2, 36, 36, 1]
    assert meta["num_targets"] == 2 and meta["splits"] == {"train": 180, "test": 90}
    reader = ShardReader(tmp_path / "mm", "test", meta, batch_size=90, train=False)
    images, labels, recon = next(reader.epoch(0))
    assert images.shape == (90, 1, 36, 36) and recon.shape == (90, 2, 1, 36, 36)
    assert torch_all(labels[:, 0] != labels[:, 1])
    merged = np.minimum((recon[:, 0] + recon[:, 1]).numpy(), 1.0)
    np.testing.assert_allclose(images.numpy(), merged, atol=1e-6)
    shifts = []
    for b in range(90):
        for t in range(2):
            digit = (recon[b, t, 0] * 255).round().numpy().astype(np.uint8)
            value, corner = _locate(digit)
            source = value - 10
            assert labels[b, t] == source % 10  # each target is its own label's digit
            shifts.append(corner - 4 - spots["test"][source])
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 6 and len(np.unique(shifts, axis=0)) > 20


def torch_all(t):
    return bool(t.all())


def test_expanded_mnist_places_whole_digits_in_40x40(marked_mnist, tmp_path):
    root, spots = marked_mnist
    make_expanded_mnist(root, tmp_path / "ex", copies=2, progress=False)
    images, labels, meta = load_split(tmp_path / "ex", "train", dataset="expanded_mnist")
    assert meta["image_shape"] == [40, 40, 1] and len(images) == 120
    for i in (0, 59, 60, 119):  # copy 2 of image i is sample 60 + i
        value, corner = _locate(images[i, ..., 0])
        source = i % 60
        assert value == 10 + source and np.abs(corner - 6 - spots["train"][source]).max() <= 6
        assert images[i].sum() == 4 * (10 + source)  # nothing cut off


def test_affnist_like_is_named_as_such_and_stays_in_frame(mnist_sample, tmp_path):
    make_affnist_like(mnist_sample, tmp_path / "al", progress=False)
    images, labels, meta = load_split(tmp_path / "al", "test", dataset="affnist_like")
    source_images, source_labels, _ = load_split(mnist_sample, "test")
    assert meta["dataset"] == "affnist_like" and "NOT affNIST" in meta["source"]
    assert images.shape == (1000, 40, 40, 1)
    np.testing.assert_array_equal(labels, source_labels)
    lit = images[..., 0] > 0
    assert lit.any((1, 2)).all()
    ink = images.reshape(1000, -1).sum(1) / source_images.reshape(1000, -1).sum(1)
    assert 0.5 < np.median(ink) < 1.6  # warped, not lost


def test_converter_refuses_to_overwrite_another_data_set(marked_mnist, tmp_path):
    root, _ = marked_mnist
    out = tmp_path / "out"
    make_expanded_mnist(root, out, progress=False)
    with pytest.raises(DataToolError, match="already holds data set 'expanded_mnist'"):
        make_multimnist(root, out, pairs=1, progress=False)
    again = make_expanded_mnist(root, out, progress=False)  # the same data again: fine
    assert again["splits"] == {"train": 60, "test": 30}
    with pytest.raises(DataToolError, match="different 'expanded_mnist' data"):
        make_expanded_mnist(root, out, seed=1, progress=False)
