"""`capsdist bench model|data -c CONFIG [key=value ...]`: one JSON line of measurements."""

from __future__ import annotations

import argparse
import importlib

from capsdist.config.args import add_config_args, config_from_args

# Each benchmark is a module with `run(cfg, args) -> dict`, imported only when asked for.
BENCHMARKS = {
    "model": ("capsdist.bench.model", "training-step throughput, memory, step / conv floor"),
    "data": ("capsdist.bench.data", "samples/s of one reader process"),
}


def _bench(args: argparse.Namespace) -> dict:
    module, _ = BENCHMARKS[args.benchmark]
    return importlib.import_module(module).run(config_from_args(args), args)


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="throughput/memory benchmarks, JSON out")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        kind = kinds.add_parser(name, help=help_text)
        add_config_args(kind)
        kind.set_defaults(func=_bench)
        if name == "model":  # its own flags (--steps, --compare-plain, ...), defined beside run()
            importlib.import_module(module).add_arguments(kind)
