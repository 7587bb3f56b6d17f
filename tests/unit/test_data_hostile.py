"""Hostile or wrong shards (issue 12, case 5): the reader ends with one DataError naming the shard
instead of looping, flooding the log or training on another file; names from a shard are shown
escaped. Hand-made tar bytes are prepended or inserted into real synthetic shards."""

import contextlib
import hashlib
import itertools
import json
import shutil
import signal

import pytest

from capsdist.data import DataError, ShardReader, read_meta
from capsdist.data.checksum import cache_dir
from capsdist.data.stream import MAX_CONSECUTIVE_SKIPS, MAX_SKIP_MESSAGES
from data_tools import make_synthetic_shards

SAMPLE = 2560  # bytes of one synthetic sample: header + 784 pixels (2 blocks), header + label
ESC = "ev\x1b[2Jil"  # a key that would clear the screen if printed raw


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Shard digests verified by these tests are remembered here, not in ~/.cache."""
    monkeypatch.setenv("CAPSDIST_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_synthetic_shards(out, n_train=100, n_test=25, samples_per_shard=25, seed=0)
    return out


@pytest.fixture
def copy(shards, tmp_path):
    return shutil.copytree(shards, tmp_path / "copy")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts the reader's loop (tests run in the main
    thread)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tar_header(name: bytes, size: bytes, kind: bytes = b"0") -> bytes:
    """A USTAR header with a correct checksum; `size` is the raw 11-character field."""
    header = bytearray(512)
    header[: len(name)] = name
    header[100:108] = b"0000644\0"
    header[124:135] = size
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def tar_member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    padding = b"\0" * (-len(data) % 512)
    return tar_header(name, b"%011o" % len(data), kind) + data + padding


def pax_header(records: dict[bytes, bytes]) -> bytes:
    """A pax extended header ('x') for the member that follows it."""
    body = b""
    for key, value in records.items():
        record = b" %s=%s\n" % (key, value)
        length = len(record) + len(str(len(record) + 2))  # the length counts its own digits
        body += b"%d%s" % (length, record)
    return tar_member(b"PaxHeader", body, b"x")


def rewrite(root, name, data: bytes, record_digest: bool = False):
    """Replace shard `name`; with record_digest, meta.json vouches for the new bytes (a data
    set hostile as a whole, not a damaged copy)."""
    (root / name).write_bytes(data)
    if record_digest:
        meta = json.loads((root / "meta.json").read_text())
        meta["shards"][name] = hashlib.sha256(data).hexdigest()
        (root / "meta.json").write_text(json.dumps(meta))
    return root / name


def read_all(root, split="train", **kwargs):
    reader = ShardReader(root, split, read_meta(root), batch_size=10, train=False, **kwargs)
    with deadline(20):
        batches = list(reader.epoch(0))
    return reader, batches


# Before the checks: a negative size sent the walk back to an earlier header forever (memory
# growing, under on_error=skip too), a non-numeric pax size escaped as a raw ValueError.
HOSTILE_SIZES = {
    "negative pax size": lambda good: pax_header({b"size": b"-1536"}) + good,
    "non-numeric pax size": lambda good: pax_header({b"size": b"12x"}) + good,
    "negative header size": lambda good: (
        good[:SAMPLE] + tar_header(b"train_00000001.img.u8", b"-0000003000") + good[SAMPLE:]
    ),
}


@pytest.mark.parametrize("case", HOSTILE_SIZES)
def test_hostile_tar_sizes_are_named_not_looped(copy, case):
    shard = copy / "train-000000.tar"
    rewrite(copy, shard.name, HOSTILE_SIZES[case](shard.read_bytes()))
    with pytest.raises(DataError) as info:
        read_all(copy)
    message = str(info.value)
    assert message.startswith(f"{shard}: unreadable or truncated shard at sample train_0000000")
    assert "not a non-negative integer" in message or "negative size -1536" in message
    reader, batches = read_all(copy, on_error="skip")  # damage like any other: left out
    assert 75 <= sum(len(b.labels) for b in batches) < 100 and reader.num_skipped >= 24


def test_swapped_shard_is_refused_naming_it(copy):
    read_all(copy)  # every shard verified once, remembered in the cache
    assert len(list(cache_dir().iterdir())) == 4
    shard = copy / "train-000002.tar"
    expected = read_meta(copy)["shards"][shard.name]
    shutil.copy2(copy / "test-000000.tar", shard)  # same size; copy2 even keeps the mtime
    actual = hashlib.sha256(shard.read_bytes()).hexdigest()
    with pytest.raises(DataError) as info:
        read_all(copy)
    assert str(info.value).startswith(
        f"{shard}: sha256 {actual}, but meta.json records {expected}: the shard was replaced"
    )
    reader, batches = read_all(copy, on_error="skip")  # refused whole, the others read
    assert reader.num_skipped == 25 and sum(len(b.labels) for b in batches) == 75


def test_skip_mode_gives_up_after_consecutive_bad_samples(tmp_path, capfd):
    n = MAX_CONSECUTIVE_SKIPS + 200
    make_synthetic_shards(tmp_path, n_train=n, n_test=10, samples_per_shard=n // 2, seed=0)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["image_shape"] = [28, 27, 1]  # every sample now has the wrong number of pixels
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    reader = ShardReader(tmp_path, "train", read_meta(tmp_path), batch_size=10, on_error="skip")
    with deadline(20), pytest.raises(DataError) as info:
        next(reader.batches())
    message = str(info.value)
    assert message.startswith(f"{MAX_CONSECUTIVE_SKIPS} consecutive bad samples, the last: ")
    assert "img.u8 holds 784 bytes" in message and "the data is damaged, rewrite it" in message
    assert capfd.readouterr().err.count("capsdist data: skipped") == MAX_SKIP_MESSAGES


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_mode_stops_when_an_epoch_has_no_batch(copy, num_workers):
    # Fewer bad samples than the limit, but all of them: `batches()` used to loop over empty
    # epochs forever, printing the same skip messages again every epoch (406 MB in 300 s).
    meta = json.loads((copy / "meta.json").read_text())
    meta["image_shape"] = [28, 27, 1]
    (copy / "meta.json").write_text(json.dumps(meta))
    reader = ShardReader(
        copy, "train", read_meta(copy), batch_size=10, on_error="skip", num_workers=num_workers
    )
    with deadline(30), pytest.raises(DataError, match="no 'train' batch of 10 in epoch 0: 100 "):
        next(reader.batches())


def test_skip_messages_only_in_the_first_epoch(copy, capfd):
    meta = json.loads((copy / "meta.json").read_text())
    meta["num_classes"] = 5  # labels 5-9 are out of range
    (copy / "meta.json").write_text(json.dumps(meta))
    reader = ShardReader(copy, "train", read_meta(copy), batch_size=10, on_error="skip")
    list(itertools.chain(reader.epoch(0), reader.epoch(1)))
    assert capfd.readouterr().err.count("capsdist data: skipped") == MAX_SKIP_MESSAGES
    assert reader.num_skipped > 2 * MAX_SKIP_MESSAGES  # counted in both epochs all the same


def test_control_bytes_in_names_are_escaped(copy, capfd):
    name = ESC.encode()
    shard = copy / "train-000000.tar"
    good = shard.read_bytes()
    rewrite(copy, shard.name, tar_member(name + b".img.u8", b"", b"3") + good)  # a char device
    with pytest.raises(DataError) as info:
        read_all(copy)
    assert repr(ESC) in str(info.value) and "\x1b" not in str(info.value)
    # A well-formed sample with such a key, in a data set whose meta.json vouches for it.
    rewrite(copy, shard.name, tar_member(name + b".img.u8", b"x") + good, record_digest=True)
    with pytest.raises(DataError, match=r"sample 'ev\\x1b\[2Jil' lacks one of img.u8, cls"):
        read_all(copy)
    read_all(copy, on_error="skip")
    err = capfd.readouterr().err
    assert repr(ESC) in err and "\x1b" not in err
