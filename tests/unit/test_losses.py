"""Margin and reconstruction losses against numbers worked out by hand."""

import pytest
import torch

from capsdist.config import LossConfig
from capsdist.models import ModelOutput, compute_loss, margin_loss, num_correct, reconstruction_loss


def test_margin_loss_paper_reduction_by_hand():
    lengths = torch.tensor([[0.8, 0.3, 0.05]])  # true class 0
    present = torch.tensor([[1.0, 0.0, 0.0]])
    # present: (0.9 − 0.8)² = 0.01; absent: 0.5·(0.3 − 0.1)² = 0.02; 0.05 < 0.1 costs nothing
    loss = margin_loss(lengths, present, LossConfig(margin_reduction="paper"))
    assert float(loss) == pytest.approx(0.03)


def test_margin_loss_reference_reduction_is_half_over_classes_of_paper():
    lengths, present = torch.rand(8, 10), torch.eye(10)[torch.randint(0, 10, (8,))]
    paper = margin_loss(lengths, present, LossConfig(margin_reduction="paper"))
    reference = margin_loss(lengths, present, LossConfig(margin_reduction="reference"))
    assert float(reference) == pytest.approx(float(paper) * 0.5 / 10, rel=1e-6)


def test_reconstruction_loss_is_batch_mean_of_per_image_sums():
    recon = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 0.0]]]])
    assert float(reconstruction_loss(recon, target)) == pytest.approx((1 + 3) / 2)


def test_total_loss_adds_weighted_reconstruction():
    out = ModelOutput(lengths=torch.tensor([[0.95, 0.0]]), reconstruction=torch.zeros(1, 1, 1, 2))
    images = torch.ones(1, 1, 1, 2)
    total, parts = compute_loss(out, torch.tensor([0]), images, LossConfig())
    assert float(parts["class_loss"]) == 0.0
    assert float(total) == pytest.approx(0.0005 * 2)


def test_two_target_accuracy_needs_both_labels_in_top_two():
    out = ModelOutput(lengths=torch.tensor([[0.9, 0.1, 0.8], [0.9, 0.7, 0.1]]))
    labels = torch.tensor([[2, 0], [0, 2]])
    assert int(num_correct(out, labels)) == 1


def test_reconstruction_slot_t_is_scored_against_target_t():
    """MultiMNIST: reconstruction slot t (decoded from label t) against source digit t."""
    digit_a, digit_b = torch.zeros(1, 1, 2), torch.ones(1, 1, 2)
    out = ModelOutput(
        lengths=torch.tensor([[0.0, 0.0, 0.95, 0.0, 0.0, 0.0, 0.0, 0.95]]),
        reconstruction=torch.stack([digit_a, digit_b])[None],  # (B=1, T=2, C, H, W)
    )
    labels = torch.tensor([[7, 2]])  # base digit first
    in_order = torch.stack([digit_a, digit_b])[None]
    _, parts = compute_loss(out, labels, in_order, LossConfig())
    assert float(parts["reconstruction_loss"]) == 0.0
    _, parts = compute_loss(out, labels, in_order.flip(1), LossConfig())
    assert float(parts["reconstruction_loss"]) == pytest.approx(2 * 2)  # both slots, 2 pixels
