"""`capsdist eval -c CONFIG ckpt=RUN_DIR_OR_FILE` and `capsdist validate -c CONFIG run.dir=DIR`."""

from __future__ import annotations

import argparse

from capsdist.config.args import add_config_args, config_from_args


def _eval(args: argparse.Namespace) -> dict:
    from capsdist.eval import run_eval

    return run_eval(config_from_args(args))


def _validate(args: argparse.Namespace) -> dict:
    from capsdist.eval.validate import run_validate

    return run_validate(config_from_args(args))


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="evaluate exported weights: ckpt=RUN_DIR|FILE")
    add_config_args(evaluate)
    evaluate.set_defaults(func=_eval)
    validate = commands.add_parser(
        "validate", help="follow a training run (run.dir=DIR), evaluating each new checkpoint"
    )
    add_config_args(validate)
    validate.set_defaults(func=_validate)
