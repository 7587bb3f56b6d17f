"""The training loop, its step, checkpoints and weight export."""

from capsdist.train.loop import NonFiniteLossError, run_training

__all__ = ["NonFiniteLossError", "run_training"]
