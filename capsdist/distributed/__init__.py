"""Distribution from outside the model: who this process is (DistEnv, its device), the batch
layout and DeepSpeed config, the process group and the engine."""

from capsdist.distributed.engine import (
    BatchLayout,
    build_deepspeed_config,
    build_engine,
    import_deepspeed,
    init_process_group,
    leave_process_group,
)
from capsdist.distributed.env import DistEnv, free_port, keep_freed_memory, pick_device

__all__ = [
    "BatchLayout",
    "DistEnv",
    "build_deepspeed_config",
    "build_engine",
    "free_port",
    "import_deepspeed",
    "init_process_group",
    "keep_freed_memory",
    "leave_process_group",
    "pick_device",
]
