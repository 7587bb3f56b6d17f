"""`capsdist ensemble-eval -c CONFIG --checkpoints 'runs/cifar{}' --num-trials 7`."""

from __future__ import annotations

import argparse

from capsdist.config.args import add_config_args, config_from_args


def _ensemble_eval(args: argparse.Namespace) -> dict:
    from capsdist.eval.ensemble import run_ensemble_eval

    return run_ensemble_eval(config_from_args(args), args.checkpoints, args.num_trials, args.out)


def register(commands: argparse._SubParsersAction) -> None:
    ensemble = commands.add_parser(
        "ensemble-eval", help="evaluate several models and their ensemble in one data pass"
    )
    ensemble.add_argument(
        "--checkpoints",
        nargs="+",
        required=True,
        metavar="PATH",
        help="run dirs or .safetensors files, a pattern with {} (0..N-1) or a glob",
    )
    ensemble.add_argument(
        "--num-trials",
        type=int,
        default=0,
        metavar="N",
        help="members expected: fills {} with 0..N-1; fewer members found is an error",
    )
    ensemble.add_argument(
        "--out", default="", metavar="DIR", help="where ensemble.json/.md go (default: beside)"
    )
    add_config_args(ensemble)
    ensemble.set_defaults(func=_ensemble_eval)
