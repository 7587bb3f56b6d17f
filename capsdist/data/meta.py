"""Read and check the meta.json that `capsdist data ...` writes beside the shards."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from capsdist.errors import UserError

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


class DataError(UserError, ValueError):
    """Shards or meta.json are missing or invalid; the message names the file (and sample key).

    A `UserError`: the CLI prints it as one line and exits with 2.
    """


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise DataError(
            f"{path}: {what}; (re)write the data set with "
            f"`capsdist data DATASET ... --out {path.parent}`"
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_meta(root: str | Path | None) -> dict[str, Any]:
    """Load `root/meta.json` and check the fields the reader relies on. Read it once per run
    and pass it down (`build_reader`, `ShardReader`, the checks in `capsdist.data.build`).

    Raises DataError when `root` is empty (data.root not set) and, naming the file, when it is
    missing, not JSON, or lacks/garbles a field.
    """
    if root is None or str(root) == "":
        raise DataError("data.root is not set: point it at shards from `capsdist data ...`")
    path = Path(root) / META_NAME
    _require(path.is_file(), path, "missing (is data.root the folder of a converted data set?)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise DataError(
            f"{path}: not valid JSON ({exn}); rewrite it with `capsdist data ...`"
        ) from exn
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
    _require(isinstance(meta["shards"], dict), path, "shards must map shard file → sha256")
    for split, count in splits.items():
        total = sum(sizes[name] for name in _shards_of(sizes, split))
        _require(total == count, path, f"split {split!r} has {count} samples, its shards {total}")
    return meta


def split_shards(meta: dict[str, Any], split: str, root: str | Path) -> list[str]:
    """Sorted shard file names of `split` (DataError if the split is not in meta.json)."""
    if split not in meta["splits"]:
        raise DataError(
            f"{Path(root) / META_NAME}: no split {split!r} (has {sorted(meta['splits'])})"
        )
    return _shards_of(meta["shard_sizes"], split)


def _shards_of(names: Any, split: str) -> list[str]:
    # Exact pattern, so that split `train` does not pick up a split called `train-extra`.
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    return sorted(name for name in names if pattern.fullmatch(name))
