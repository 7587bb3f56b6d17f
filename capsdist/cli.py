"""The `capsdist` command: parse, run one job, print its result as the last line of stdout.

Every command is declared here (`capsdist data ...` in data_tools/cli.py) and calls one function of
the package; each imports its package only when run, so `capsdist --help` stays fast. Every
failure the user can fix (a bad key, a missing file, a damaged shard) is a `UserError`: a one-line
message on stderr naming the file or key, and exit status 2. A training stopped by a signal
(SIGTERM, SIGINT, SIGUSR1) after saving a checkpoint exits with STOPPED.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import data_tools.cli
from capsdist.config import Config, field_docs, load_config, parse_hparams_override
from capsdist.errors import UserError

# Exit status of a job that a signal stopped cleanly at a checkpoint: "stopped, resumable; run
# the same command again". sysexits.h's EX_TEMPFAIL ("try again later"), rather than the shell's
# 128 + signal number, which a job killed outright by that signal also gets: a requeue script
# (SLURM) can tell the two apart.
STOPPED = 75

# ---- the config arguments every model command shares --------------------------------------------


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """-c YAML (repeatable), --hparams_override a=1,b=2, key=value overrides."""
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


# ---- the commands: each returns its result dict -------------------------------------------------


def _train(args: argparse.Namespace) -> dict:
    from capsdist.data import read_meta
    from capsdist.train import run_training
    from capsdist.viz import FigureCallback

    cfg = config_from_args(args)
    meta = read_meta(cfg.data.root)
    # With periodic evaluation, every evaluation also redraws the figures (run.dir/figures, W&B).
    callbacks = [FigureCallback(cfg, meta)] if cfg.train.eval_every else []
    return run_training(cfg, callbacks, meta)


def _eval(args: argparse.Namespace) -> dict:
    from capsdist.eval import run_eval

    return run_eval(config_from_args(args))


def _validate(args: argparse.Namespace) -> dict:
    from capsdist.eval import run_validate

    return run_validate(config_from_args(args))


def _ensemble_eval(args: argparse.Namespace) -> dict:
    from capsdist.eval import run_ensemble_eval

    return run_ensemble_eval(config_from_args(args), args.checkpoints, args.num_trials, args.out)


def _viz(args: argparse.Namespace) -> dict:
    from capsdist.viz import run_viz

    return run_viz(config_from_args(args), args.out)


def _sweep(args: argparse.Namespace) -> dict:
    from capsdist.tune import load_sweep
    from capsdist.tune.sweep import run_sweep

    return run_sweep(load_sweep(args.config, args.overrides), resume=args.resume)


def _bench_model(args: argparse.Namespace) -> dict:
    from capsdist.bench import model

    return model.run(config_from_args(args), args)


def _bench_data(args: argparse.Namespace) -> dict:
    from capsdist.bench import data

    return data.run(config_from_args(args))


def _keys(args: argparse.Namespace) -> dict:
    docs = field_docs()
    for key, (default, doc) in docs.items():
        print(f"{key} = {default!r}\n    {doc}", file=sys.stderr)
    return {"num_keys": len(docs)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsdist", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data_tools.cli.register(commands)

    def model_command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        add_config_args(sub)
        sub.set_defaults(func=func)
        return sub

    model_command("train", _train, "train a model (plain python, torchrun, deepspeed)")
    model_command("eval", _eval, "evaluate exported weights (ckpt=RUN_DIR or FILE)")
    model_command("validate", _validate, "follow a training run, evaluate each new checkpoint")
    commands.add_parser(
        "keys", help="list every config key with its default and meaning"
    ).set_defaults(func=_keys)

    bench = commands.add_parser("bench", help="throughput/memory benchmarks, JSON out")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    bench_model = kinds.add_parser("model", help="training-step throughput, memory, step / floor")
    add_config_args(bench_model)
    bench_model.add_argument("--steps", type=int, default=10, help="timed rounds (default 10)")
    bench_model.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    bench_model.add_argument(
        "--compare-plain",
        action="store_true",
        help="also time the plain PyTorch CapsNet (capsdist/models/plain.py) as the baseline",
    )
    bench_model.add_argument(
        "--optimizer",
        choices=("fused", "foreach"),
        default="fused",
        help="torch Adam implementation (same maths; fused is ~3x faster on CPU)",
    )
    bench_model.set_defaults(func=_bench_model)
    bench_data = kinds.add_parser("data", help="samples/s of one reader process")
    add_config_args(bench_data)
    bench_data.set_defaults(func=_bench_data)

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

    ensemble = model_command(
        "ensemble-eval", _ensemble_eval, "evaluate several models and their ensemble in one pass"
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

    viz = model_command(
        "viz", _viz, "figures: reconstructions, capsule perturbations, confusion, routing"
    )
    viz.add_argument("--out", default="", metavar="DIR", help="default: beside the weights/figures")
    return parser


# ---- running one command ------------------------------------------------------------------------


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
    stopped = result.get("stopped")
    if os.environ.get("RANK", "0") == "0":  # one result line per job, not one per rank
        print(json.dumps({k: _json_safe(v) for k, v in result.items()}), flush=True)
        if stopped:
            print(
                f"capsdist {args.command}: stopped by {stopped} at step {result['step']}, "
                "with a checkpoint: run the same command again to resume",
                file=sys.stderr,
            )
    return _exit(STOPPED if stopped else 0)


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
