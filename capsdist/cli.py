"""The `capsdist` command: parse, run one job, print its result as the last line of stdout.

Each command lives beside the code it runs and registers itself here. Every failure the user
can fix (a bad key, a missing file, a damaged shard) is a `UserError`: a one-line message on
stderr naming the file or key, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys

from capsdist.errors import UserError

# Modules with a `register(subparsers)` function, in the order `capsdist --help` lists them.
COMMAND_MODULES = (
    "data_tools.cli",
    "capsdist.train.command",
    "capsdist.eval.command",
    "capsdist.config.command",
    "capsdist.bench.command",
    "capsdist.tune.command",
    "capsdist.eval.ensemble_command",
    "capsdist.viz.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsdist", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts `--local_rank=N` before the subcommand; it also sets
    LOCAL_RANK in the environment, which is what DistEnv reads."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            kept.append(arg)
    return kept


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_strip_local_rank(sys.argv[1:] if argv is None else argv))
    try:
        result = args.func(args)
    except UserError as err:
        print(f"capsdist {args.command}: error: {err}", file=sys.stderr)
        return _exit(2)
    if os.environ.get("RANK", "0") == "0":  # one result line per job, not one per rank
        print(json.dumps({k: _json_safe(v) for k, v in result.items()}), flush=True)
    return _exit(0)


def _exit(code: int) -> int:
    """In a multi-process job, leave without running C++ static destructors. Workaround: a rank
    that had finished cleanly (process group already destroyed, results written) was seen to
    abort at interpreter exit ("terminate called without an active exception", torch 2.13 +
    gloo + DeepSpeed), which torchrun reports as a failed job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
