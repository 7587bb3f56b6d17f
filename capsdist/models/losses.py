"""Margin, reconstruction and CNN losses with the reference's constants (layers.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capsdist.config.schema import LossConfig
from capsdist.models.layers import ModelOutput


def targets_multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels (B,) or (B, T) → (B, J) with a 1 for every present class."""
    labels_bt = labels.view(labels.shape[0], -1)
    return F.one_hot(labels_bt, num_classes).amax(dim=1).float()


def margin_loss(
    lengths_bj: torch.Tensor, present_bj: torch.Tensor, cfg: LossConfig
) -> torch.Tensor:
    """T·max(0, m⁺ − ℓ)² + λ·(1 − T)·max(0, ℓ − m⁻)² per class (paper eq. 4).

    `reference` reduction: the code halves both terms and takes the mean over batch AND classes,
    i.e. (0.5 / J) × the paper's loss. `paper`: sum over classes, mean over the batch.
    """
    present = present_bj * F.relu(cfg.m_plus - lengths_bj).pow(2)
    absent = cfg.down_weight * (1.0 - present_bj) * F.relu(lengths_bj - cfg.m_minus).pow(2)
    per_class = present + absent
    if cfg.margin_reduction == "reference":
        return 0.5 * per_class.mean()
    return per_class.sum(dim=1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch mean of the per-image SUM of squared pixel errors (one term per target, summed)."""
    return (reconstruction - targets).pow(2).flatten(1).sum(dim=1).mean()


def compute_loss(
    output: ModelOutput,
    labels: torch.Tensor,
    recon_targets: torch.Tensor | None,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts. recon_targets: the images the decoder should reproduce, shaped
    like output.reconstruction (the input for one target, the source digits for MultiMNIST)."""
    lengths = output.lengths.float()
    num_classes = lengths.shape[1]
    present = targets_multi_hot(labels, num_classes)
    if cfg.name == "margin":
        main = margin_loss(lengths, present, cfg)
    elif cfg.name == "softmax":
        main = F.cross_entropy(lengths, labels.view(-1))
    else:  # sigmoid against labels / num_targets, as the reference's 2-target baseline
        main = F.binary_cross_entropy_with_logits(lengths, present / present.sum(1, keepdim=True))
    parts = {"class_loss": main.detach()}
    total = main
    if output.reconstruction is not None and recon_targets is not None:
        recon = reconstruction_loss(output.reconstruction.float(), recon_targets.float())
        parts["reconstruction_loss"] = recon.detach()
        total = total + cfg.reconstruction_weight * recon
    return total, parts


def num_correct(output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    """Examples whose top-T classes by length equal the set of T true classes (the reference's
    "correct"; T = 1 is ordinary accuracy)."""
    labels_bt = labels.view(labels.shape[0], -1)
    predicted = output.predictions(labels_bt.shape[1]).view_as(labels_bt)
    return (predicted == labels_bt.sort(dim=1).values).all(dim=1).sum()
