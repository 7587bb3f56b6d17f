"""`capsdist eval -c CONFIG ckpt=RUN_DIR_OR_FILE`."""

from __future__ import annotations

import argparse

from capsdist.config.args import add_config_args, config_from_args


def _eval(args: argparse.Namespace) -> dict:
    from capsdist.eval import run_eval

    return run_eval(config_from_args(args))


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="evaluate exported weights: ckpt=RUN_DIR|FILE")
    add_config_args(evaluate)
    evaluate.set_defaults(func=_eval)
