"""The training loop every launcher runs, its step, and DeepSpeed checkpoints."""

from capsdist.train.loop import NonFiniteLossError, on_every_rank, run_training

__all__ = ["NonFiniteLossError", "on_every_rank", "run_training"]
