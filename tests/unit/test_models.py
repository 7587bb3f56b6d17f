"""Model shapes, parameter counts of the paper's models, init and decoder masking. The forward
and training checks run on $CAPSDIST_TEST_DEVICE (tests/device.py)."""

import pytest
import torch

from capsdist.config import load_config
from capsdist.models import build_model, compute_loss, num_parameters
from tests.device import DEVICE


@pytest.mark.parametrize(
    ("preset", "overrides", "expected"),
    [
        ("mnist", [], 8_215_728),  # the paper's 8.2 M
        ("mnist", ["model.reconstruction=false"], 6_804_384),  # 6.8 M
        ("mnist", ["model.image_shape=[36,36,1]"], 11_361_968),  # MultiMNIST, 11.36 M
        ("cifar10", [], 22_476_448),
        ("mnist", ["model.name=baseline_paper", "loss.name=softmax"], 35_445_522),  # 35.4 M
    ],
)
def test_parameter_counts_match_the_paper(preset, overrides, expected):
    cfg = load_config([f"configs/{preset}.yaml"], overrides)
    assert num_parameters(build_model(cfg.model)) == expected


@pytest.mark.parametrize("preset", ["mnist", "cifar10", "smallnorb", "debug_cpu", "mnist_sample"])
def test_every_preset_builds_and_runs_forward(preset):
    cfg = load_config([f"configs/{preset}.yaml"])
    model = build_model(cfg.model).to(DEVICE)
    h, w, c = cfg.model.image_shape
    out = model(torch.rand(2, c, h, w, device=DEVICE))
    assert out.lengths.shape == (2, cfg.model.num_classes)
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()
    if cfg.model.reconstruction:
        assert out.reconstruction.shape == (2, c, h, w)
    else:
        assert out.reconstruction is None


def test_cifar_primary_capsules_use_same_padding():
    model = build_model(load_config(["configs/cifar10.yaml"]).model)
    assert model.primary.num_capsules() == 64 * 12 * 12


def test_reference_initialisation():
    model = build_model(load_config(["configs/mnist.yaml"]).model)
    w = model.classes.weight.detach()
    assert abs(float(w.std()) - 0.088) < 0.01  # truncated normal std 0.1 → 0.088 after truncation
    assert float(w.abs().max()) <= 0.2
    assert torch.all(model.classes.bias == 0.1) and torch.all(model.conv1.bias == 0.1)


def test_decoder_masks_by_labels_in_training_and_eval_and_by_prediction_without_labels():
    """As the reference's remake: given labels mask the decoder in evaluation too, so the eval
    loss of a misclassified image is that of its true label's reconstruction."""
    cfg = load_config(["configs/debug_cpu.yaml"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        model.eval()
        unlabelled = model(images)
        predicted = unlabelled.lengths.argmax(-1)
        wrong = (predicted + 1) % 10  # every prediction is wrong for these labels
        eval_by_label = model(images, wrong).reconstruction
        by_prediction = model(images, predicted).reconstruction
        model.train()  # no dropout: training mode computes the same function
        train_by_label = model(images, wrong).reconstruction
    torch.testing.assert_close(eval_by_label, train_by_label)
    torch.testing.assert_close(by_prediction, unlabelled.reconstruction)
    per_image_change = (eval_by_label - unlabelled.reconstruction).abs().flatten(1).amax(1)
    assert (per_image_change > 1e-4).all()


def test_two_target_model_reconstructs_each_digit():
    cfg = load_config(
        ["configs/debug_cpu.yaml"], ["model.num_targets=2", "model.image_shape=[36,36,1]"]
    )
    model = build_model(cfg.model)
    out = model(torch.rand(3, 1, 36, 36), torch.tensor([[1, 2], [3, 4], [5, 6]]))
    assert out.reconstruction.shape == (3, 2, 1, 36, 36)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_two_target_slots_follow_the_given_label_order(mode):
    """MultiMNIST stores the base digit first, often the larger class: slot t must be decoded
    from label t (the loss pairs slot t with source digit t), not from the ascending top-2."""
    cfg = load_config(
        ["configs/debug_cpu.yaml"], ["model.num_targets=2", "model.image_shape=[36,36,1]"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).train(mode == "train")
    with torch.no_grad():
        out = model(torch.rand(1, 1, 36, 36), torch.tensor([[7, 2]]))
        from_7 = model.decoder(out.poses, torch.tensor([[7]]))[:, 0]
        from_2 = model.decoder(out.poses, torch.tensor([[2]]))[:, 0]
    torch.testing.assert_close(out.reconstruction[:, 0], from_7)
    torch.testing.assert_close(out.reconstruction[:, 1], from_2)
    assert not torch.allclose(from_7, from_2)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    cfg = load_config(["configs/debug_cpu.yaml"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(DEVICE)
    images = torch.rand(16, 1, 28, 28, device=DEVICE)
    labels = torch.arange(16, device=DEVICE) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss, _ = compute_loss(model(images, labels), labels, images, cfg.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_baselines_return_logits():
    for name, n in [("baseline", 10), ("baseline_paper", 10)]:
        cfg = load_config(["configs/mnist.yaml"], [f"model.name={name}", "loss.name=softmax"])
        out = build_model(cfg.model)(torch.rand(2, 1, 28, 28))
        assert out.lengths.shape == (2, n) and out.reconstruction is None
