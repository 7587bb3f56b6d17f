"""The training loop, its step, checkpoints and weight export.

`run_training` is imported lazily: `capsdist.eval` needs `capsdist.train.checkpoint`, and the
loop needs `capsdist.eval`; importing the loop here would make that a cycle.
"""

__all__ = ["NonFiniteLossError", "on_every_rank", "run_training"]


def __getattr__(name: str):
    if name in __all__:
        from capsdist.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'capsdist.train' has no attribute {name!r}")
