"""ShardReader: splitting by rank, deterministic shuffles, resume, and errors naming the file."""

import hashlib
import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from capsdist.data import Augmentation, DataError, ShardReader, read_meta
from data_tools import make_synthetic_shards

# 8 train shards of 25 (200 samples), 2 test shards of 25.
N_TRAIN = 200


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_synthetic_shards(out, n_train=N_TRAIN, n_test=50, samples_per_shard=25, seed=0)
    return out


@pytest.fixture
def copy(shards, tmp_path):
    """A private copy of the shards that a test may damage."""
    return shutil.copytree(shards, tmp_path / "copy")


def digests(batches):
    """sha1 of each image's bytes, in order: identifies samples without keys."""
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for xs, _, _ in batches for x in xs]


def assert_same_batches(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for (xa, ya, _), (xb, yb, _) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def reader_of(root, split, shift_pixels=0, **kwargs):
    """A ShardReader with meta.json read here, as callers do (once, then passed down)."""
    augment = Augmentation(shift_pixels=shift_pixels)
    return ShardReader(root, split, read_meta(root), augment=augment, **kwargs)


def edit_meta(root, **changes):
    meta = json.loads((root / "meta.json").read_text())
    meta.update(changes)
    (root / "meta.json").write_text(json.dumps(meta))


def test_batches_shapes_types_and_counts(shards):
    train = reader_of(shards, "train", batch_size=16, shift_pixels=2)
    batches = list(train.epoch(0))
    assert train.batches_per_epoch == N_TRAIN // 16 == len(batches)  # drop_last
    x, y, recon_targets = batches[0]
    assert recon_targets is None  # one target: the decoder reproduces the input
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.is_contiguous()
    test = reader_of(shards, "test", batch_size=16, train=False)
    sizes = [len(y) for _, y, _ in test.epoch(0)]
    assert test.batches_per_epoch == len(sizes) and sizes == [16, 16, 16, 2]  # last kept


def test_two_ranks_read_disjoint_halves_of_the_split(shards):
    everything = digests(reader_of(shards, "train", batch_size=10, train=False).epoch(0))
    for train in (False, True):
        readers = [
            reader_of(shards, "train", batch_size=10, rank=r, world_size=2, train=train)
            for r in (0, 1)
        ]
        parts = [digests(reader.epoch(0)) for reader in readers]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(everything)


def test_eval_rank_without_shards_is_an_error(shards):
    with pytest.raises(DataError, match="rank 9 gets none"):
        reader_of(shards, "test", batch_size=4, rank=9, world_size=10, train=False)


def test_too_few_shards_for_ranks_x_workers_resamples(shards):
    # 2 test shards of 25 for 4 ranks: every rank draws whole shards, 50 // 4 = 12 samples each.
    readers = [
        reader_of(shards, "test", batch_size=4, rank=r, world_size=4, seed=3) for r in range(4)
    ]
    assert all(r.resampled and r.batches_per_epoch == 3 for r in readers)
    everything = set(digests(reader_of(shards, "test", batch_size=10, train=False).epoch(0)))
    for reader in readers:
        first = digests(reader.epoch(0))
        assert len(first) == 12 and set(first) <= everything
        assert first == digests(reader.epoch(0))  # deterministic in (seed, rank, epoch)
    assert digests(readers[0].epoch(0)) != digests(readers[1].epoch(0))
    # 2 shards < 2 ranks x 2 workers: 25 samples per rank, 13 + 12 per worker, batches of 5.
    workers = reader_of(shards, "test", batch_size=5, world_size=2, num_workers=2)
    assert workers.resampled and len(list(workers.epoch(0))) == workers.batches_per_epoch == 4


def test_training_order_is_a_function_of_seed_rank_epoch(shards):
    def reader(seed=0, shift=2):
        return reader_of(
            shards,
            "train",
            batch_size=20,
            seed=seed,
            rank=1,
            world_size=2,
            shift_pixels=shift,
            shuffle_buffer=50,
        )

    assert_same_batches(reader().epoch(1), reader().epoch(1))
    epoch0, epoch1 = digests(reader(shift=0).epoch(0)), digests(reader(shift=0).epoch(1))
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)  # same samples, new order
    assert digests(reader(seed=1, shift=0).epoch(0)) != epoch0
    assert digests(reader().epoch(0)) != epoch0  # shifted


def test_eval_order_is_fixed_and_unshifted(shards):
    def reader():
        return reader_of(shards, "train", batch_size=20, train=False, shift_pixels=2)

    assert_same_batches(reader().epoch(0), reader().epoch(3))
    labels = torch.cat([y for _, y, _ in reader().epoch(0)])
    first = reader_of(shards, "train", batch_size=200, train=False, max_examples=30)
    x, y, _ = next(first.epoch(0))
    assert first.num_examples == 30 and torch.equal(y, labels[:30])


def test_resume_equals_the_tail_across_an_epoch_boundary(shards):
    reader = reader_of(shards, "train", batch_size=16, shift_pixels=2, shuffle_buffer=40)
    per_epoch = reader.batches_per_epoch  # 12
    for start in (5, per_epoch + 3):
        expected = itertools.islice(reader.batches(0), start, start + per_epoch)
        assert_same_batches(itertools.islice(reader.batches(start), per_epoch), expected)


def test_dataloader_workers(shards):
    reader = reader_of(shards, "train", batch_size=10, num_workers=2, shift_pixels=1)
    first = list(reader.epoch(0))
    assert len(first) == reader.batches_per_epoch == N_TRAIN // 10
    assert_same_batches(first, reader.epoch(0))
    everything = digests(reader_of(shards, "train", batch_size=10, train=False).epoch(0))
    parallel = reader_of(shards, "train", batch_size=10, train=False, num_workers=2)
    assert sorted(digests(parallel.epoch(0))) == sorted(everything)


def test_missing_meta_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match="meta.json.*capsdist data"):
        read_meta(tmp_path)
    for unset in ("", None):
        with pytest.raises(DataError, match="data.root is not set: point it at shards"):
            read_meta(unset)


def test_training_reader_without_augment_does_not_augment(shards):
    # The shift's default lives in the config schema only (data.shift_pixels), not here.
    plain = ShardReader(shards, "train", read_meta(shards), batch_size=20, shuffle_buffer=50)
    assert not plain.augment.random
    everything = digests(reader_of(shards, "train", batch_size=20, train=False).epoch(0))
    assert sorted(digests(plain.epoch(0))) == sorted(everything)  # shuffled, not shifted


def test_read_split_arrays_is_the_eval_order_in_uint8(shards):
    from capsdist.data import read_split_arrays

    images, labels = read_split_arrays(shards, "test", read_meta(shards))
    assert images.dtype == np.uint8 and images.shape == (50, 28, 28, 1) and labels.shape == (50,)
    x, y, _ = zip(*reader_of(shards, "test", batch_size=7, train=False).epoch(0), strict=True)
    pixels = torch.cat(x).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images, pixels)
    np.testing.assert_array_equal(labels, torch.cat(y).numpy())


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", ["half", "inside_data"])
def test_truncated_shard_is_named(copy, num_workers, cut):
    shard = copy / "train-000003.tar"
    data = shard.read_bytes()
    # Each sample: 512-byte header + 1024 bytes of pixels, 512-byte header + 512 of label.
    end = len(data) // 2 if cut == "half" else 14 * 2560 + 512 + 100
    shard.write_bytes(data[:end])
    reader = reader_of(copy, "train", batch_size=10, num_workers=num_workers)
    with pytest.raises(DataError) as info:
        list(reader.epoch(0))
    message = str(info.value)
    assert message.startswith(f"{shard}: ") and "\n" not in message
    if cut == "inside_data":  # the sample being read when the data ended is named
        assert message.endswith(
            "unreadable or truncated shard at sample train_00000089 (unexpected end of data)"
        )


def test_shard_cut_between_samples_is_named(copy):
    # A tar cut at a member boundary still parses; its sha256 (meta.json) catches it.
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 10 * 2560])  # 10 whole samples (2 members each)
    with pytest.raises(DataError, match="train-000001.tar: sha256 .* but meta.json records"):
        list(reader_of(copy, "train", batch_size=10, train=False).epoch(0))


def test_shard_count_other_than_meta_is_named(copy):
    edit_meta(copy, shard_sizes={**read_meta(copy)["shard_sizes"], "test-000001.tar": 26})
    edit_meta(copy, splits={"train": N_TRAIN, "test": 51})
    with pytest.raises(DataError, match="test-000001.tar: holds 25 samples, meta.json says 26"):
        list(reader_of(copy, "test", batch_size=10, train=False).epoch(0))


def test_image_size_must_match_meta(copy):
    edit_meta(copy, image_shape=[28, 27, 1])
    with pytest.raises(
        DataError, match=r"train-000000.tar: sample train_00000000: img.u8 holds 784"
    ):
        list(reader_of(copy, "train", batch_size=10, train=False).epoch(0))


def test_label_out_of_range_is_named(copy):
    edit_meta(copy, num_classes=1)  # every label > 0 is now out of range
    with pytest.raises(
        DataError, match=r"train-000000.tar: sample train_\d{8}: label\(s\) [1-9] do"
    ):
        list(reader_of(copy, "train", batch_size=10, train=False).epoch(0))


def test_missing_shard_is_named(copy):
    (copy / "test-000001.tar").unlink()
    with pytest.raises(DataError, match="test-000001.tar: shard listed in meta.json is missing"):
        reader_of(copy, "test", batch_size=10, train=False)


def test_corrupt_header_names_shard_and_sample(copy):
    shard = copy / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[4 * 2560 + 124] ^= 0x01  # a size digit of sample 4's img.u8 header (key ...054)
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000002.tar: .*sample train_00000054"):
        list(reader_of(copy, "train", batch_size=10, train=False).epoch(0))


def test_on_error_skip_leaves_bad_samples_out_and_counts_them(copy):
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 10 * 2560 + 700])  # 10 good samples, then cut
    edit_meta(copy, num_classes=5)  # labels 5-9 are now out of range
    reader = reader_of(copy, "train", batch_size=10, train=False, on_error="skip")
    labels = torch.cat([y for _, y, _ in reader.epoch(0)])
    assert labels.max() < 5
    assert reader.num_skipped == N_TRAIN - len(labels) and 15 <= reader.num_skipped < N_TRAIN
    with pytest.raises(DataError):
        list(reader_of(copy, "train", batch_size=10, train=False).epoch(0))


def test_shards_stay_readable_by_webdataset_and_tar_both_ways(shards, tmp_path):
    import tarfile

    import webdataset as wds

    ours = digests(reader_of(shards, "test", batch_size=10, train=False).epoch(0))
    theirs = [
        hashlib.sha1(
            (torch.frombuffer(bytearray(s["img.u8"]), dtype=torch.uint8).float() / 255)
            .numpy()
            .tobytes()
        ).hexdigest()
        for s in wds.WebDataset(str(shards / "test-{000000..000001}.tar"), shardshuffle=False)
    ]
    assert ours == theirs
    with tarfile.open(shards / "test-000000.tar") as tar:
        assert tar.getnames()[:2] == ["test_00000000.img.u8", "test_00000000.cls"]
    # ... and a shard written by webdataset's own TarWriter reads here.
    copy = shutil.copytree(shards, tmp_path / "wds")
    with wds.TarWriter(str(copy / "test-000000.tar")) as sink:
        for sample in wds.WebDataset(str(shards / "test-000000.tar"), shardshuffle=False):
            sink.write({k: v for k, v in sample.items() if k in ("__key__", "img.u8", "cls")})
    digest = hashlib.sha256((copy / "test-000000.tar").read_bytes()).hexdigest()
    edit_meta(copy, shards={**read_meta(copy)["shards"], "test-000000.tar": digest})
    again = digests(reader_of(copy, "test", batch_size=10, train=False).epoch(0))
    assert again == ours
