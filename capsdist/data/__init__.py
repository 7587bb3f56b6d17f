"""Reading the shards that `data_tools` writes: meta.json, the sharded reader, augmentation."""

from capsdist.data.augment import Augmentation, random_shift
from capsdist.data.build import build_augmentation, build_reader
from capsdist.data.meta import DataError, read_meta
from capsdist.data.reader import Batch, ShardReader

__all__ = [
    "Augmentation",
    "Batch",
    "DataError",
    "ShardReader",
    "build_augmentation",
    "build_reader",
    "random_shift",
    "read_meta",
]
