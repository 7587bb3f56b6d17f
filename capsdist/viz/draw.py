"""What the figures show, computed from a live model: reconstructions, the capsule-dimension
perturbation grid, routing coefficients, the confusion matrix, MultiMNIST's two colours.

Shapes: B batch, J classes, D class-capsule dims, I input capsules, T targets, S perturbation
steps; images (B, C, H, W) in the model, (B, H, W, C) numpy for drawing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from capsdist.models import ModelOutput
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
