"""`capsdist eval` reports the reference's evaluation loss (issue 11, item 8): the decoder is
masked by the TRUE labels, in their stored order, as in training. Before, it was masked by the
predictions, sorted ascending, so on MultiMNIST about half the pairs (stored base digit first)
scored each reconstruction against the other digit."""

from __future__ import annotations

import pytest
import torch

from capsdist.config import load_config
from capsdist.data import read_meta
from capsdist.eval import build_eval_reader, evaluate
from capsdist.models import build_model, compute_loss
from data_tools import make_multimnist

pytestmark = pytest.mark.slow


def test_multimnist_eval_loss_is_the_label_masked_training_objective(mnist_sample, tmp_path):
    make_multimnist(mnist_sample, tmp_path / "mm", pairs=1, progress=False)
    cfg = load_config(
        ["configs/debug_cpu.yaml"],
        [
            f"data.root={tmp_path}/mm",
            "data.dataset=multimnist",
            "model.image_shape=[36,36,1]",
            "model.num_targets=2",
            "eval.max_examples=300",
            # Weigh the reconstruction like the margin loss: an untrained decoder's images
            # depend little on which capsule is kept, and this is what the test is about.
            "loss.reconstruction_weight=1.0",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    reader = build_eval_reader(cfg, read_meta(cfg.data.root), torch.device("cpu"))
    scores = evaluate(model, reader, cfg)

    label_sum = prediction_sum = 0.0
    examples = descending = 0
    with torch.no_grad():
        for images, labels, recon_targets in reader.epoch(0):
            # The objective training minimises (train mode: the decoder takes the labels).
            loss, _ = compute_loss(model.train()(images, labels), labels, recon_targets, cfg.loss)
            label_sum += float(loss) * len(images)
            # What evaluation used to score: reconstructions of the sorted predictions.
            loss, _ = compute_loss(model.eval()(images), labels, recon_targets, cfg.loss)
            prediction_sum += float(loss) * len(images)
            examples += len(images)
            descending += int((labels[:, 0] > labels[:, 1]).sum())
    assert scores["num_examples"] == examples == 300
    assert descending > 50  # the data stores pairs base digit first: many are not ascending
    assert scores["loss"] == pytest.approx(label_sum / examples, rel=1e-5)
    assert abs(scores["loss"] - prediction_sum / examples) > 1e-3
