"""`capsdist train -c CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse

from capsdist.config.args import add_config_args, config_from_args


def _train(args: argparse.Namespace) -> dict:
    from capsdist.train import run_training
    from capsdist.viz.callback import FigureCallback

    cfg = config_from_args(args)
    # With periodic evaluation, every evaluation also redraws the figures (run.dir/figures, W&B).
    return run_training(cfg, callbacks=[FigureCallback(cfg)] if cfg.train.eval_every else [])


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (plain python, torchrun, deepspeed)")
    add_config_args(train)
    train.set_defaults(func=_train)
