"""Reading the shards that `data_tools` writes: meta.json, checks against the config, the
sharded reader, augmentation. Read meta.json once per run (`read_meta`) and pass it down."""

from capsdist.data.augment import Augmentation, random_shift
from capsdist.data.build import (
    build_augmentation,
    build_reader,
    check_data_matches_model,
    check_extra_eval_root,
)
from capsdist.data.meta import read_meta
from capsdist.data.reader import Batch, ShardReader, read_split_arrays
from capsdist.data.urls import DataError, is_remote

__all__ = [
    "Augmentation",
    "Batch",
    "DataError",
    "ShardReader",
    "build_augmentation",
    "build_reader",
    "check_data_matches_model",
    "check_extra_eval_root",
    "random_shift",
    "is_remote",
    "read_meta",
    "read_split_arrays",
]
