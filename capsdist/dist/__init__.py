"""Distribution from outside the model: who we are (DistEnv), the DeepSpeed config and engine."""

from capsdist.dist.deepspeed_config import batch_layout, build_deepspeed_config
from capsdist.dist.env import DistEnv

__all__ = ["DistEnv", "batch_layout", "build_deepspeed_config"]
