"""`capsdist viz -c CONFIG ckpt=RUN_DIR_OR_FILE [--out DIR]`: the figures of exported weights."""

from __future__ import annotations

import argparse

from capsdist.config.args import add_config_args, config_from_args


def run_viz(cfg, out: str = "") -> dict:
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from capsdist.eval.evaluate import build_eval_reader, load_model, resolve_weights
    from capsdist.viz.draw import draw_figures

    weights = resolve_weights(cfg.ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(weights, cfg, device)
    reader = build_eval_reader(cfg, device)
    batch = next(iter(reader.epoch(0)))
    out_dir = Path(out) if out else weights.parent / "figures"
    paths = draw_figures(
        model,
        batch.images,
        out_dir,
        labels=batch.labels,
        num_targets=cfg.model.num_targets,
        reader=reader,
        title=weights.parent.name,
    )
    if cfg.wandb.mode != "disabled":
        from capsdist.track import WandbSink

        sink = WandbSink(out_dir, cfg.wandb, asdict(cfg), job_type="viz")
        try:
            sink.log_images(0, {f"figures/{name}": path for name, path in paths.items()})
        finally:
            sink.close()
    return {"figures": {name: str(path) for name, path in paths.items()}, "out": str(out_dir)}


def _viz(args: argparse.Namespace) -> dict:
    return run_viz(config_from_args(args), args.out)


def register(commands: argparse._SubParsersAction) -> None:
    viz = commands.add_parser(
        "viz", help="figures: reconstructions, capsule perturbations, confusion, routing"
    )
    viz.add_argument("--out", default="", metavar="DIR", help="default: beside the weights/figures")
    add_config_args(viz)
    viz.set_defaults(func=_viz)
