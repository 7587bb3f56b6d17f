"""Reading the shards that `data_tools` writes: meta.json, the sharded reader, augmentation."""

from capsdist.data.augment import random_shift
from capsdist.data.meta import DataError, read_meta
from capsdist.data.reader import Batch, ShardReader

__all__ = ["Batch", "DataError", "ShardReader", "random_shift", "read_meta"]
