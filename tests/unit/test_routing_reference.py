"""The fast CapsNet and its routing against the plain PyTorch CapsNet of capsdist/models/plain.py.

`PlainCapsNet` is the textbook implementation (Sabour et al. 2017 + the reference code's quirks,
see /work/shared/reference/capsnet_spec.md): votes as one einsum into a (B, I, J, D) tensor,
routing through autograd, TensorFlow padding by hand. It shares nothing with the fast path but
the parameter names, so `load_state_dict` copies the fast model's weights into it. Both routing
passes of the fast path (the fused C++ one and torch ops) are checked, in fp64, to rounding.
The fast model runs on $CAPSDIST_TEST_DEVICE (tests/device.py; `make gpu-check` sets `cuda`),
the references always on the CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from capsdist.config import load_config
from capsdist.models import build_model, compute_loss
from capsdist.models.plain import PlainCapsNet, plain_routing
from capsdist.models.routing import cpu_kernels, route_capsules
from tests.device import DEVICE, conv_fp32, ieee_fp32, on_device

PASSES = pytest.mark.parametrize("fused", [True, False], ids=["fused_cpu", "torch_ops"])


def build_pair(overrides, dtype=torch.float64, seed=0):
    """(config, the fast model on DEVICE, the plain model on the CPU), with the same weights."""
    cfg = load_config(["configs/debug_cpu.yaml"], overrides)
    torch.manual_seed(seed)
    fast = build_model(cfg.model).to(dtype)
    plain = PlainCapsNet(cfg.model).to(dtype)
    plain.load_state_dict(fast.state_dict(), strict=True)
    return cfg, fast.to(DEVICE), plain


VARIANTS = {
    "reference": [],
    "one_iteration": ["model.routing_iters=1"],
    "two_iterations": ["model.routing_iters=2"],
    "five_iterations": ["model.routing_iters=5"],
    "leaky": ["model.leaky_routing=true"],
    "detach": ["model.routing_detach=true"],
    "detach_leaky_same": [
        "model.routing_detach=true",
        "model.leaky_routing=true",
        "model.padding=SAME",
        "model.image_shape=[24,24,3]",
    ],
    "same_padding": ["model.padding=SAME"],
    "two_targets": ["model.num_targets=2", "model.image_shape=[36,36,1]"],
    "no_decoder": ["model.reconstruction=false"],
    "paper_primary_scaling": ["model.primary_scaling=paper"],
    "one_iteration_in_training": ["model.train_routing_iters=1"],
}


def test_fused_cpu_routing_builds_here():
    """The fused C++ passes build on this machine (else every run warns and routes on torch
    ops, and the tests below would check only one path)."""
    assert cpu_kernels() is not None


@PASSES
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_capsnet_equals_plain_reference_values_and_gradients(variant, fused):
    cfg, fast, plain = build_pair([*VARIANTS[variant], f"model.fused_routing={fused}"])
    h, w, c = cfg.model.image_shape
    torch.manual_seed(1)
    images = torch.rand(5, c, h, w, dtype=torch.float64)
    labels = torch.randint(0, 10, (5, cfg.model.num_targets)).squeeze(1)
    if cfg.model.num_targets == 2:  # base digit first: half the pairs in descending order
        labels = torch.stack([torch.tensor([k % 2, 1 - k % 2]) + k for k in range(5)])

    out = fast(*on_device(images, labels))
    ref = plain(images, labels)
    assert out.coupling.shape == ref.coupling.shape == (5, fast.primary.num_capsules(), 10)
    for name in ("lengths", "poses", "coupling"):
        got, want = getattr(out, name).cpu(), getattr(ref, name)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)
    if ref.reconstruction is None:
        assert out.reconstruction is None
    else:
        torch.testing.assert_close(
            out.reconstruction.cpu(), ref.reconstruction, rtol=1e-9, atol=1e-11
        )

    # Gradients of the training loss (margin + reconstruction) and of a term on the couplings
    # (nothing in training uses them, but the fast backward must still be right for them).
    targets = images if cfg.model.num_targets == 1 else torch.stack([images, images], 1)
    loss_fast, _ = compute_loss(out, *on_device(labels, targets), cfg.loss)
    loss_fast = loss_fast + (out.coupling**2).sum() * 0.1
    loss_plain, _ = compute_loss(ref, labels, targets, cfg.loss)
    loss_plain = loss_plain + (ref.coupling**2).sum() * 0.1
    torch.testing.assert_close(loss_fast.cpu(), loss_plain, rtol=1e-10, atol=1e-12)
    loss_fast.backward()
    loss_plain.backward()
    plain_params = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        want = plain_params[name].grad
        torch.testing.assert_close(p.grad.cpu(), want, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("given", ["labels", "no_labels"])
def test_eval_mode_reconstructions_equal_plain_reference(given):
    """In evaluation too, given labels mask the decoder in their order (base digit first, here
    often the larger class); without labels both mask by the top-2 classes, ascending."""
    _, fast, plain = build_pair(VARIANTS["two_targets"])
    fast.eval(), plain.eval()
    torch.manual_seed(4)
    images = torch.rand(4, 1, 36, 36, dtype=torch.float64)
    labels = torch.tensor([[7, 2], [1, 8], [4, 3], [9, 0]]) if given == "labels" else None
    with torch.no_grad():
        out = fast(*on_device(images, *([] if labels is None else [labels])))
        ref = plain(images, labels)
    torch.testing.assert_close(out.reconstruction.cpu(), ref.reconstruction, rtol=1e-9, atol=1e-11)


@PASSES
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("detach", [False, True], ids=["through", "detach"])
@pytest.mark.parametrize("iters", [1, 2, 3])
def test_route_capsules_equals_plain_routing_of_einsum_votes(iters, detach, leaky, fused):
    """The class-capsule layer's routing of given (u, W) against plain_routing of the votes
    û = W u built by one einsum: outputs, couplings and the gradients of u, W and the bias."""
    torch.manual_seed(2)
    b, i, k, j, d = 3, 7, 2, 4, 5
    u = torch.randn(b, i, k, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(i, k, j * d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(j, d, dtype=torch.float64, requires_grad=True)
    weights_v, weights_c = torch.randn(b, j, d), torch.randn(b, i, j)

    def plain(u, weight, bias, iters, leaky, detach):
        votes = torch.einsum("bik,ikjd->bijd", u, weight.view(i, k, j, d))
        return plain_routing(votes, bias, iters, leaky, detach)

    def fast(u, weight, bias, iters, leaky, detach):
        return route_capsules(u, weight, bias, iters, leaky, detach, fused=fused)

    results = []
    for fn, device in ((fast, DEVICE), (plain, torch.device("cpu"))):
        inputs = [t.detach().to(device).requires_grad_() for t in (u, weight, bias)]
        v, c = fn(*inputs, iters, leaky, detach)
        loss = (v * weights_v.to(device)).sum() + (c * weights_c.to(device)).sum()
        grads = torch.autograd.grad(loss, inputs)
        results.append([t.cpu() for t in (v, c, *grads)])
    names = ["v", "c", "grad_u", "grad_weight", "grad_bias"]
    for name, got, want in zip(names, *results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


# fp32 to float tolerance; with TF32 convolutions (cuDNN's default for fp32 on a GPU: a 10-bit
# mantissa, 4x bf16's precision) to a quarter of the bf16 tolerance below. On a CPU both are fp32.
FP32_TOLERANCE = {"ieee": (1e-4, 1e-5), "tf32": (0.0125, 0.005)}


@PASSES
@pytest.mark.parametrize("arithmetic", sorted(FP32_TOLERANCE))
def test_fp32_matches_fp64_reference_to_float_tolerance(fused, arithmetic):
    overrides = ["model.leaky_routing=true", f"model.fused_routing={fused}"]
    cfg, fast, plain = build_pair(overrides, dtype=torch.float32, seed=3)
    plain64 = PlainCapsNet(cfg.model).double()
    plain64.load_state_dict({k: v.cpu() for k, v in fast.state_dict().items()})
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8)
    with conv_fp32(arithmetic):
        out = fast(*on_device(images, labels))
    ref = plain64(images.double(), labels)
    rtol, atol = FP32_TOLERANCE[arithmetic]
    torch.testing.assert_close(out.lengths.double().cpu(), ref.lengths, rtol=rtol, atol=atol)
    torch.testing.assert_close(
        out.reconstruction.double().cpu(), ref.reconstruction, rtol=rtol, atol=atol
    )


def test_routing_stays_fp32_under_bf16_autocast():
    cfg, fast, _ = build_pair([], dtype=torch.float32)
    images, labels = on_device(torch.rand(4, 1, 28, 28), torch.arange(4))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = fast(images, labels)
    assert out.poses.dtype == out.coupling.dtype == torch.float32
    with ieee_fp32():
        reference = fast(images, labels)
    # The convolutions ran in bf16, routing in fp32: lengths agree to bf16 precision.
    torch.testing.assert_close(out.lengths, reference.lengths, rtol=0.05, atol=0.02)
    ones = torch.ones(4, fast.primary.num_capsules(), device=DEVICE)
    torch.testing.assert_close(out.coupling.sum(-1), ones, rtol=1e-5, atol=1e-5)


def test_bf16_model_trains_a_step_with_fp32_routing():
    cfg, fast, _ = build_pair([], dtype=torch.bfloat16)
    images, labels = on_device(torch.rand(4, 1, 28, 28), torch.arange(4))
    out = fast(images.bfloat16(), labels)
    loss, _ = compute_loss(out, labels, images, cfg.loss)
    loss.backward()
    assert out.poses.dtype == torch.float32
    assert fast.classes.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(fast.classes.weight.grad.float()).all()


def test_channels_last_gives_the_same_model_output():
    cfg, fast, _ = build_pair([], dtype=torch.float32)
    (images,) = on_device(torch.rand(3, 1, 28, 28))
    with ieee_fp32():  # two cuDNN layouts, two algorithms: compared at fp32 precision
        reference = fast(images).lengths
        fast.channels_last = True
        torch.testing.assert_close(fast(images).lengths, reference, rtol=1e-5, atol=1e-6)


def test_compile_failure_falls_back_to_eager_with_a_warning():
    cfg = load_config(["configs/debug_cpu.yaml"], ["model.compile=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images = torch.rand(2, 1, 28, 28)

    def broken(*_):  # what torch.compile raises where no backend works (e.g. no C++ compiler)
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no cc"), None)

    model._compiled = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(images)
    assert any("running eager" in str(w.message) for w in caught)
    assert model._compiled is None
    torch.testing.assert_close(out.lengths, model(images).lengths)
    assert set(model.state_dict()) == set(
        build_model(load_config(["configs/debug_cpu.yaml"]).model).state_dict()
    )
