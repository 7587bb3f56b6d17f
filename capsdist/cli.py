"""The `capsdist` command: parse, run one job, print its result as the last line of stdout.

Every failure the user can fix (a bad key, a missing file, a damaged shard) becomes a one-line
message on stderr naming the file or key, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from capsdist.config import ConfigError, load_config, parse_hparams_override


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                        help="config preset (repeatable; later files win)")
    parser.add_argument("--hparams_override", default="", metavar="a=1,b=2",
                        help="the reference's hyper-parameter string, e.g. routing=1,remake=false")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.max_steps=100 model.routing_iters=1")


def _load(args: argparse.Namespace):
    overrides = parse_hparams_override(args.hparams_override) + list(args.overrides)
    return load_config(args.config, overrides)


def _train(args: argparse.Namespace) -> dict:
    from capsdist.train import run_training

    return run_training(_load(args))


def _eval(args: argparse.Namespace) -> dict:
    from capsdist.eval import run_eval

    return run_eval(_load(args))


def _keys(args: argparse.Namespace) -> dict:
    from capsdist.config.docs import field_docs

    for key, (default, doc) in field_docs().items():
        print(f"{key} = {default!r}\n    {doc}", file=sys.stderr)
    return {"num_keys": len(field_docs())}


def build_parser() -> argparse.ArgumentParser:
    from data_tools.cli import register as register_data_commands

    parser = argparse.ArgumentParser(prog="capsdist", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="convert a data set into shards")
    register_data_commands(data.add_subparsers(dest="dataset", required=True))

    train = commands.add_parser("train", help="train a model (any launcher)")
    _config_args(train)
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="evaluate exported weights: ckpt=RUN_DIR|FILE")
    _config_args(evaluate)
    evaluate.set_defaults(func=_eval)

    keys = commands.add_parser("keys", help="list every config key with its default and meaning")
    keys.set_defaults(func=_keys)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from capsdist.data import DataError
    from capsdist.train.checkpoint import CheckpointError
    from data_tools.errors import DataToolError

    return (ConfigError, DataError, DataToolError, CheckpointError, FileNotFoundError)


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except _user_errors() as err:
        print(f"capsdist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from capsdist.train import NonFiniteLossError

        if not isinstance(err, NonFiniteLossError):
            raise
        print(f"capsdist {args.command}: error: {err}", file=sys.stderr)
        return 3
    print(json.dumps({k: _json_safe(v) for k, v in result.items()}), flush=True)
    return 0
