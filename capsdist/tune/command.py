"""`capsdist sweep -c configs/sweeps/NAME.yaml [--resume] [key=value ...]`."""

from __future__ import annotations

import argparse


def _sweep(args: argparse.Namespace) -> dict:
    from capsdist.tune import load_sweep
    from capsdist.tune.sweep import run_sweep

    return run_sweep(load_sweep(args.config, args.overrides), resume=args.resume)


def register(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser("sweep", help="Ray Tune sweep over config keys (sweep YAML)")
    sweep.add_argument("-c", "--config", required=True, metavar="SWEEP_YAML", help="sweep file")
    sweep.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep in its sweep.dir"
    )
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="sweep.KEY=V sets a sweep option; any other key=V every trial's config",
    )
    sweep.set_defaults(func=_sweep)
