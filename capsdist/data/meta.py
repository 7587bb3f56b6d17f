"""Read and check the meta.json that `capsdist data ...` writes beside the shards.

`data.root` is a folder or a URL (urls.py); meta.json is read from it through fetch.py when
remote. Shards are beside meta.json, unless meta.json names another place in `shard_root`:
what `capsdist data index SHARDS --out DIR` writes for a webdataset set that capsdist did not
write and may not write into (someone's bucket, a read-only HTTP server).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from capsdist.data.fetch import NotFound, read_bytes
from capsdist.data.images import IMAGE_FIELDS, RAW_FIELD
from capsdist.data.urls import PIPE, DataError, is_remote, join, local

META_NAME = "meta.json"
# What the reader needs; converters write more (mean/std, label_counts, source, fingerprint).
REQUIRED_KEYS = (
    "dataset",
    "splits",
    "image_shape",
    "num_classes",
    "num_targets",
    "shards",
    "shard_sizes",
)


__all__ = ["META_NAME", "DataError", "read_meta", "shard_root", "split_shards"]


def _require(cond: bool, path: str, what: str) -> None:
    if not cond:
        raise _invalid(path, what)


def _invalid(path: str, what: str) -> DataError:
    if is_remote(path):  # someone else's data, maybe read-only: no advice to write there
        return DataError(
            f"{path}: {what}; point data.root at a data set written by `capsdist data ...`"
        )
    return DataError(
        f"{path}: {what}; (re)write the data set with "
        f"`capsdist data DATASET ... --out {Path(path).parent}`"
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def read_meta(root: str | Path | None) -> dict[str, Any]:
    """Load `root/meta.json` and check the fields the reader relies on. Read it once per run
    and pass it down (`build_reader`, `ShardReader`, the checks in `capsdist.data.build`).

    Raises DataError when `root` is empty (data.root not set) and, naming the file or URL,
    when it is missing or unreachable, not JSON, or lacks/garbles a field.
    """
    if root is None or str(root) == "":
        raise DataError("data.root is not set: point it at shards from `capsdist data ...`")
    if str(root).startswith(PIPE):
        raise DataError(
            f"data.root={root}: a folder or URL, not a command; `pipe:` commands go in data.shards"
        )
    path = join(root, META_NAME)
    text = _meta_text(path)
    try:
        meta = json.loads(text)
    except ValueError as exn:
        raise _invalid(path, f"not valid JSON ({exn})") from exn
    _require(isinstance(meta, dict), path, "not a JSON object")
    for key in REQUIRED_KEYS:
        _require(key in meta, path, f"no {key!r} field")
    shape = meta["image_shape"]
    _require(
        isinstance(shape, list) and len(shape) == 3 and all(map(_positive_int, shape)),
        path,
        f"image_shape must be [H, W, C] of positive ints, got {shape!r}",
    )
    _require(_positive_int(meta["num_classes"]), path, "num_classes must be a positive int")
    _require(meta["num_targets"] in (1, 2), path, "num_targets must be 1 or 2")
    splits, sizes = meta["splits"], meta["shard_sizes"]
    _require(isinstance(splits, dict) and splits, path, "splits must map split name → samples")
    _require(
        isinstance(sizes, dict) and all(isinstance(n, int) and n >= 0 for n in sizes.values()),
        path,
        "shard_sizes must map shard file → number of samples",
    )
    digests = meta["shards"]
    _require(
        isinstance(digests, dict) and all(_is_sha256(digests.get(name)) for name in sizes),
        path,
        "shards must map every shard file in shard_sizes → its sha256 (64 hex digits)",
    )
    for split, count in splits.items():
        total = sum(sizes[name] for name in _shards_of(sizes, split))
        _require(total == count, path, f"split {split!r} has {count} samples, its shards {total}")
    field = meta.get("image_field", RAW_FIELD)
    _require(
        field in (RAW_FIELD, *IMAGE_FIELDS), path, f"image_field {field!r} is not an image field"
    )
    _require(
        isinstance(meta.get("shard_root", ""), str), path, "shard_root must be a folder or URL"
    )
    return meta


def _meta_text(path: str) -> str:
    """meta.json's text; a DataError that names it when it is missing or unreachable."""
    if not is_remote(path):
        _require(
            Path(path).is_file(), path, "missing (is data.root the folder of a converted data set?)"
        )
        try:
            return Path(path).read_text()
        except (OSError, ValueError) as exn:
            raise DataError(f"{path}: cannot read it ({exn})") from exn
    try:
        data = read_bytes(path, large=False)  # kilobytes
    except NotFound as exn:
        raise DataError(
            f"{exn}: is data.root the folder or URL of a data set from `capsdist data ...`? "
            f"(for webdataset shards that capsdist did not write, run `capsdist data index "
            f"SHARDS --out DIR` and set data.root=DIR)"
        ) from exn
    return data.decode("utf-8", "replace")


def shard_root(meta: dict[str, Any], root: str | Path) -> str:
    """Where the shards of data set `root` (with meta.json `meta`) are: beside meta.json, or
    at meta.json's `shard_root`."""
    return meta.get("shard_root") or local(root)


def split_shards(meta: dict[str, Any], split: str, root: str | Path) -> list[str]:
    """Sorted shard file names of `split` (DataError if the split is not in meta.json)."""
    if split not in meta["splits"]:
        raise DataError(
            f"{join(root, META_NAME)}: no split {split!r} (has {sorted(meta['splits'])})"
        )
    return _shards_of(meta["shard_sizes"], split)


def _shards_of(names: Any, split: str) -> list[str]:
    # Exact pattern, so that split `train` does not pick up a split called `train-extra`.
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    return sorted(name for name in names if pattern.fullmatch(name))
