"""The `capsdist` command: parse, run one job, print its result as the last line of stdout.

Every command is declared here (`capsdist data ...` in data_tools/cli.py) and calls one function of
the package; each imports its package only when run, so `capsdist --help` stays fast. Every
failure the user can fix (a bad key, a missing file, a damaged shard) is a `UserError`: a one-line
message on stderr naming the file or key, and exit status 2. A command that did its work but
not all of it (`predict` with unreadable inputs, `export` failing its parity check) puts `error`
in its result line, says it on stderr and exits with PARTIAL. A training stopped by a signal
(SIGTERM, SIGINT, SIGUSR1) after saving a checkpoint exits with STOPPED.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from importlib import metadata

import data_tools.cli
from capsdist import __version__
from capsdist.config import Config, field_docs, load_config, parse_hparams_override
from capsdist.errors import UserError

# Exit status of a job that a signal stopped cleanly at a checkpoint: "stopped, resumable; run
# the same command again". sysexits.h's EX_TEMPFAIL ("try again later"), rather than the shell's
# 128 + signal number, which a job killed outright by that signal also gets: a requeue script
# (SLURM) can tell the two apart.
STOPPED = 75
# Exit status of a command whose result line holds `error`: it ran, but some of its work failed.
PARTIAL = 1

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
    if args.curves:  # from metrics.jsonl files alone: no config, no model
        from capsdist.viz.curves import run_curves

        return run_curves(args.curves, args.out, args.labels, args.metric)
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
        print(f"{key} = {default!r}\n    {doc}")  # stdout: `capsdist keys | grep lr` works
    return {"num_keys": len(docs)}


# A word of the `predict` / `export` command line that is a config override, not a file: ckpt=...,
# model.x=..., --hparams_override aside. A file whose name looks like one is still a file.
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(key=value overrides, paths) of the positional words, in order."""
    overrides, paths = [], []
    for item in items:
        is_override = _OVERRIDE.match(item) and not os.path.exists(item)
        (overrides if is_override else paths).append(item)
    return overrides, paths


def _serving_config(args: argparse.Namespace, overrides: list[str]):
    """The config saved in the weights < -c files < overrides; (config, weights file)."""
    from capsdist.serve import load_serving_config

    every = parse_hparams_override(args.hparams_override) + overrides
    return load_serving_config(args.config, every)


def _predict(args: argparse.Namespace) -> dict:
    from capsdist.serve import run_predict

    overrides, paths = _split_overrides(args.inputs)
    if not paths:
        raise UserError("nothing to predict: name image files, .npy files, folders or shards")
    cfg, weights = _serving_config(args, overrides)
    return run_predict(
        cfg,
        weights,
        paths,
        invert=args.invert,
        recon_dir=args.recon,
        batch_size=args.batch_size,
    )


def _export(args: argparse.Namespace) -> dict:
    from capsdist.serve import run_export

    cfg, weights = _serving_config(args, args.overrides)
    return run_export(cfg, weights, args.format, args.out, args.opset, args.parity_examples)


def _version() -> str:
    """capsdist's version and the engines' that decide its behaviour (for bug reports)."""
    engines = []
    for name in ("torch", "deepspeed"):
        try:
            engines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            engines.append(f"{name} not installed")
    return f"capsdist {__version__} (python {platform.python_version()}, {', '.join(engines)})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsdist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
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
        help="also time the plain PyTorch CapsNet (capsdist/models/plain.py), in the same engine",
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
    viz.add_argument(
        "--out",
        default="",
        metavar="DIR",
        help="default: beside the weights/figures; with --curves: the PNG file to write",
    )
    viz.add_argument(
        "--curves",
        nargs="+",
        default=[],
        metavar="RUN_DIR",
        help="instead: draw --metric against training seconds for these runs side by side "
        "(their metrics.jsonl; train with train.eval_every_s=N)",
    )
    viz.add_argument(
        "--labels", nargs="+", default=[], metavar="NAME", help="--curves: one name per run"
    )
    viz.add_argument(
        "--metric", default="eval_accuracy", help="--curves: the metric drawn (eval_accuracy)"
    )
    _add_serving_commands(commands)
    return parser


def _add_serving_commands(commands) -> None:
    """`predict` and `export`: the model outside the shard format (capsdist/serve/)."""
    predict = commands.add_parser(
        "predict",
        help="classify image files, .npy arrays, folders or shards: one JSON line per image",
        description="Classify images with exported weights: ckpt=RUN_DIR_OR_FILE, then image "
        "files (PNG, JPEG, ...), .npy arrays, folders of them, or shard sets (a folder or URL "
        "with meta.json). The config comes from the weights; key=value words override it "
        "(e.g. data.eval_split=train for shards). One JSON line per input on stdout, then a "
        "summary line; unreadable inputs get an `error` line and a non-zero exit at the end.",
    )
    predict.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config preset(s) over the one saved in the weights (needed only by weights "
        "without one)",
    )
    predict.add_argument("--hparams_override", default="", help=argparse.SUPPRESS)
    predict.add_argument(
        "inputs", nargs="+", metavar="ckpt=PATH | key=value | PATH", help="weights and inputs"
    )
    predict.add_argument(
        "--invert",
        action="store_true",
        help="inputs are dark on light (scans, drawings): invert them for white-on-black "
        "data sets such as MNIST",
    )
    predict.add_argument(
        "--recon",
        default="",
        metavar="DIR",
        help="write each input beside its reconstruction(s) as DIR/NNNNNN-NAME.png",
    )
    predict.add_argument(
        "--batch-size", type=int, default=0, metavar="N", help="default: eval.batch_size"
    )
    predict.set_defaults(func=_predict)

    export = commands.add_parser(
        "export",
        help="ONNX or torch.export (.pt2) model, checked against eager evaluation",
        description="Export weights (ckpt=RUN_DIR_OR_FILE) as a graph that takes `images` "
        "(N, C, H, W) float in [0, 1] and returns `lengths` [and `reconstruction`]; the file "
        "is run back (onnxruntime / torch) on test images and kept only if it matches eager "
        "evaluation within 1e-4.",
    )
    add_config_args(export)
    export.add_argument(
        "--format", choices=("onnx", "pt2"), default="", help="default: from --out, else onnx"
    )
    export.add_argument(
        "--out", default="", metavar="FILE", help="default: beside the weights (model.onnx)"
    )
    export.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    export.add_argument(
        "--parity-examples", type=int, default=64, metavar="N", help="images checked (default 64)"
    )
    export.set_defaults(func=_export)


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


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line; `predict` also takes inputs after its options (`ckpt=R a.png --invert
    b.png`), which argparse alone leaves unrecognised."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "inputs") and not any(e.startswith("-") for e in extra):
        args.inputs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(_strip_local_rank(sys.argv[1:] if argv is None else argv))
    try:
        result = args.func(args)
    except UserError as err:
        print(f"capsdist {args.command}: error: {err}", file=sys.stderr)
        return _exit(2)
    stopped, failed = result.get("stopped"), result.get("error")
    if os.environ.get("RANK", "0") == "0":  # one result line per job, not one per rank
        print(json.dumps({k: _json_safe(v) for k, v in result.items()}), flush=True)
        if stopped:
            print(
                f"capsdist {args.command}: stopped by {stopped} at step {result['step']}, "
                "with a checkpoint: run the same command again to resume",
                file=sys.stderr,
            )
        if failed:
            print(f"capsdist {args.command}: error: {failed}", file=sys.stderr)
    return _exit(STOPPED if stopped else PARTIAL if failed else 0)


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
