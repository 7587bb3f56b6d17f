"""The config arguments every command shares: -c YAML, --hparams_override, key=value."""

from __future__ import annotations

import argparse

from capsdist.config.loading import load_config, parse_hparams_override
from capsdist.config.schema import Config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config preset (repeatable; later files win)",
    )
    parser.add_argument(
        "--hparams_override",
        default="",
        metavar="a=1,b=2",
        help="the reference's hyper-parameter string, e.g. routing=1,remake=false",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.max_steps=100 model.routing_iters=1",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = parse_hparams_override(args.hparams_override) + list(args.overrides)
    return load_config(args.config, overrides)
