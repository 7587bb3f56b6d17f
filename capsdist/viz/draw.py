"""What the figures show, computed from a live model: reconstructions, the capsule-dimension
perturbation grid, routing coefficients, the confusion matrix, MultiMNIST's two colours; drawn
by `capsdist viz` from exported weights (`run_viz`) and at every evaluation of a training run
(`FigureCallback`). figures.py draws the arrays.

Shapes: B batch, J classes, D class-capsule dims, I input capsules, T targets, S perturbation
steps; images (B, C, H, W) in the model, (B, H, W, C) numpy for drawing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from capsdist.config import Config, config_to_dict
from capsdist.data import read_meta
from capsdist.distributed import pick_device
from capsdist.eval import build_eval_reader, load_model
from capsdist.models import ModelOutput
from capsdist.run_dir import resolve_weights
from capsdist.track import build_wandb_sink, log_images
from capsdist.viz import figures

# The paper's Figure 4: each dimension moved from -0.25 to 0.25 in steps of 0.05 (11 columns).
DELTAS = np.round(np.arange(-0.25, 0.25 + 1e-9, 0.05), 2) + 0.0  # + 0.0: no "-0.00" label


def _hwc(images_bchw: torch.Tensor) -> np.ndarray:
    return images_bchw.detach().float().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy()


@torch.no_grad()
def perturbed_reconstructions(model, poses_jd: torch.Tensor, target: int) -> torch.Tensor:
    """(D, S, C, H, W): the decoder's image of one example's poses with dimension d of the
    `target` class capsule moved by DELTAS[s]."""
    num_dims = poses_jd.shape[-1]
    deltas = torch.as_tensor(DELTAS, dtype=poses_jd.dtype, device=poses_jd.device)
    poses = poses_jd.expand(num_dims, len(DELTAS), *poses_jd.shape).clone()  # (D, S, J, D)
    dims = torch.arange(num_dims, device=poses.device)
    poses[dims, :, target, dims] += deltas  # row d moves only dimension d
    flat = poses.flatten(0, 1)  # (D·S, J, D)
    targets = torch.full((flat.shape[0], 1), target, device=flat.device, dtype=torch.long)
    images = model.decoder(flat, targets)[:, 0]  # (D·S, C, H, W)
    return images.view(num_dims, len(DELTAS), *images.shape[1:])


@torch.no_grad()
def confusion_counts(model, reader, num_classes: int, max_batches: int = 0) -> np.ndarray:
    """(J, J) counts over the reader's split: rows true, columns predicted. For two targets the
    sorted true pair is matched with the sorted predicted pair, position by position."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    dtype = next(model.parameters()).dtype
    for n, batch in enumerate(reader.epoch(0)):
        if max_batches and n >= max_batches:
            break
        labels_bt = batch.labels.view(batch.labels.shape[0], -1)
        preds_bt = model(batch.images.to(dtype)).predictions(labels_bt.shape[1])
        true = labels_bt.sort(dim=1).values.flatten().cpu().numpy()
        np.add.at(matrix, (true, preds_bt.view(len(labels_bt), -1).flatten().cpu().numpy()), 1)
    return matrix


@torch.no_grad()
def draw_figures(
    model: torch.nn.Module,
    images: torch.Tensor,
    out_dir: Path,
    *,
    labels: torch.Tensor,
    num_targets: int,
    reader=None,
    max_confusion_batches: int = 0,
    title: str = "",
    max_images: int = 8,
) -> dict[str, Path]:
    """Draw every figure that applies to `model` into out_dir; returns {name: png path}.
    images (B, C, H, W) and labels from the evaluation split; `reader` (optional) gives the
    confusion matrix. The model is put in eval mode (decoder masked by the prediction) and
    restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        dtype = next(model.parameters()).dtype
        images = images[:max_images].to(dtype)
        labels = labels[:max_images]
        out: ModelOutput = model(images)
        preds = out.predictions(num_targets).view(len(images), -1).cpu().tolist()
        true = labels.view(len(images), -1).cpu().tolist()
        paths: dict[str, Path] = {}
        inputs = _hwc(images)
        suffix = f" ({title})" if title else ""
        if out.reconstruction is not None and num_targets == 1:
            paths["reconstructions"] = figures.reconstructions(
                inputs,
                _hwc(out.reconstruction),
                [",".join(map(str, t)) for t in true],
                [",".join(map(str, p)) for p in preds],
                out_dir / "reconstructions.png",
            )
        if out.reconstruction is not None and num_targets == 2:
            recon = out.reconstruction.float().cpu().permute(0, 1, 3, 4, 2).clamp(0, 1).numpy()
            paths["multimnist"] = figures.two_colour(
                inputs, recon, [tuple(p) for p in preds], out_dir / "multimnist.png"
            )
        if out.poses is not None and getattr(model, "decoder", None) is not None:
            target = preds[0][0]
            grid = perturbed_reconstructions(model, out.poses[0], target)
            paths["perturbations"] = figures.perturbation_grid(
                _hwc(grid.flatten(0, 1)).reshape(*grid.shape[:2], *inputs.shape[1:]),
                DELTAS,
                f"class {target} capsule: each dimension moved by -0.25..0.25{suffix}",
                out_dir / "perturbations.png",
            )
        if out.coupling is not None:
            paths["routing"] = figures.routing(
                inputs[0],
                out.coupling[0].float().cpu().numpy(),
                out.lengths[0].float().cpu().numpy(),
                f"label {true[0]}, predicted {preds[0]}{suffix}",
                out_dir / "routing.png",
            )
        if reader is not None:
            num_classes = out.lengths.shape[1]
            matrix = confusion_counts(model, reader, num_classes, max_confusion_batches)
            accuracy = np.trace(matrix) / max(matrix.sum(), 1)
            paths["confusion"] = figures.confusion_matrix(
                matrix,
                [str(j) for j in range(num_classes)],
                f"{int(matrix.sum())} labels, {100 * accuracy:.2f} % on the diagonal{suffix}",
                out_dir / "confusion.png",
            )
        return paths
    finally:
        model.train(was_training)


def run_viz(cfg: Config, out: str = "") -> dict:
    """`capsdist viz`: the figures of cfg.ckpt's exported weights on a batch of the evaluation
    split, into `out` (default: figures/ beside the weights) and, unless disabled, W&B."""
    weights = resolve_weights(cfg.ckpt)
    device = pick_device()
    model = load_model(weights, cfg, device)
    reader = build_eval_reader(cfg, read_meta(cfg.data.root), device)
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
    sink = build_wandb_sink(out_dir, cfg.wandb, config_to_dict(cfg), job_type="viz")
    if sink is not None:
        try:
            sink.log_images(0, {f"figures/{name}": path for name, path in paths.items()})
        finally:
            sink.close()
    return {"figures": {name: str(path) for name, path in paths.items()}, "out": str(out_dir)}


class FigureCallback:
    """A training callback (`run_training(cfg, [FigureCallback(cfg, meta)], meta)`; `meta` is
    data.root's meta.json, read once by the caller).

    Draws when the metrics hold `eval_accuracy` (every train.eval_every steps and at the end),
    from a fixed batch of the evaluation split, so successive figures are comparable. The PNGs
    in run.dir/figures/ are the latest; W&B keeps every evaluation's (images by step), logged
    to the training loop's own W&B run when there is one.
    """

    def __init__(self, cfg: Config, meta: dict, max_confusion_batches: int = 10):
        self.cfg, self.meta = cfg, meta
        self.out_dir = Path(cfg.run.dir) / "figures"
        self.max_confusion_batches = max_confusion_batches
        self._reader = None
        self._batch = None

    def __call__(self, step: int, metrics: dict[str, float], model: torch.nn.Module) -> None:
        if "eval_accuracy" not in metrics:
            return
        if self._reader is None:
            device = next(model.parameters()).device
            self._reader = build_eval_reader(self.cfg, self.meta, device)
            self._batch = next(iter(self._reader.epoch(0)))
        paths = draw_figures(
            model,
            self._batch.images,
            self.out_dir,
            labels=self._batch.labels,
            num_targets=self.cfg.model.num_targets,
            reader=self._reader,
            max_confusion_batches=self.max_confusion_batches,
            title=f"step {step}",
        )
        # The training loop's W&B run is wandb.run in this process; only if the loop imported
        # W&B (never start W&B here).
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            log_images(wandb.run, step, {f"figures/{name}": path for name, path in paths.items()})
