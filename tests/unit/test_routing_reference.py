"""The fast CapsNet against a plain PyTorch reference written here, independently and naively.

`PlainCapsNet` is the textbook implementation (Sabour et al. 2017 + the reference code's quirks,
see /work/shared/reference/capsnet_spec.md): votes as one broadcast (B, I, J, D) tensor, routing
through autograd, TensorFlow padding by hand. It shares nothing with capsdist/models but the
parameter names, so `load_state_dict` copies the fast model's weights into it. It is also what
`capsdist bench model --compare-plain` times as the plain baseline (run from the repo root).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from capsdist.config import load_config
from capsdist.models import build_model, compute_loss
from capsdist.models.routing import route
from capsdist.models.routing_kernels import cpu_kernels

EPS = 1e-9  # the epsilon capsdist puts inside its square roots


def plain_squash(s: torch.Tensor) -> torch.Tensor:
    sq = (s * s).sum(-1, keepdim=True)
    return sq / (1 + sq) * s / torch.sqrt(sq + EPS)


def plain_routing(votes, bias, iters, leaky, detach):
    """votes (B, I, J, D): Procedure 1 of the paper, softmax over the classes, autograd only."""
    b, i, j, _ = votes.shape
    logits = torch.zeros(b, i, j, dtype=votes.dtype)
    for r in range(iters):
        last = r == iters - 1
        u_hat = votes if (last or not detach) else votes.detach()
        if leaky:
            with_orphan = torch.cat([torch.zeros(b, i, 1, dtype=votes.dtype), logits], dim=2)
            c = torch.softmax(with_orphan, dim=2)[:, :, 1:]
        else:
            c = torch.softmax(logits, dim=2)
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1) + bias  # (B, J, D)
        v = plain_squash(s)
        if not last:
            logits = logits + (u_hat * v.unsqueeze(1)).sum(-1)
    return v, c


def tf_pad(x: torch.Tensor, kernel: int, stride: int, same: bool) -> torch.Tensor:
    if not same:
        return x
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: W then H
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class _Conv(nn.Module):
    def __init__(self, c_in, c_out, k, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.empty(c_out)) if bias else None


class _Primary(nn.Module):
    def __init__(self, c_in, types, dim, k):
        super().__init__()
        self.conv = _Conv(c_in, types * dim, k, bias=False)
        self.bias = nn.Parameter(torch.empty(types, dim))


class _Classes(nn.Module):
    def __init__(self, n_in, d_in, classes, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, d_in, classes * d_out))
        self.bias = nn.Parameter(torch.empty(classes, d_out))


class _Decoder(nn.Module):
    def __init__(self, widths):
        super().__init__()
        layers = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1], nn.Sigmoid())


class PlainCapsNet(nn.Module):
    """The reference CapsNet in plain PyTorch, parameters named as capsdist's CapsNet."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        h, w, c = cfg.image_shape
        same = cfg.padding == "SAME"
        h1 = h if same else h - cfg.conv1_kernel + 1
        h2 = math.ceil(h1 / 2) if same else (h1 - cfg.primary_kernel) // 2 + 1
        w1 = w if same else w - cfg.conv1_kernel + 1
        w2 = math.ceil(w1 / 2) if same else (w1 - cfg.primary_kernel) // 2 + 1
        self.num_inputs = cfg.num_prime_capsules * h2 * w2
        self.conv1 = _Conv(c, cfg.conv1_channels, cfg.conv1_kernel)
        self.primary = _Primary(
            cfg.conv1_channels, cfg.num_prime_capsules, cfg.prime_dim, cfg.primary_kernel
        )
        self.classes = _Classes(self.num_inputs, cfg.prime_dim, cfg.num_classes, cfg.class_dim)
        widths = [cfg.num_classes * cfg.class_dim, *cfg.decoder_hidden, c * h * w]
        self.decoder = _Decoder(widths) if cfg.reconstruction else None

    def forward(self, images, labels=None):
        cfg, same = self.cfg, self.cfg.padding == "SAME"
        x = tf_pad(images, cfg.conv1_kernel, 1, same)
        x = F.relu(F.conv2d(x, self.conv1.weight, self.conv1.bias))
        x = F.conv2d(tf_pad(x, cfg.primary_kernel, 2, same), self.primary.conv.weight, stride=2)
        b, _, gh, gw = x.shape
        types, dim = cfg.num_prime_capsules, cfg.prime_dim
        x = x.view(b, types, dim, gh, gw).permute(0, 1, 3, 4, 2)  # (B, types, H, W, Din)
        share = 1.0 / (types + 1 if cfg.leaky_routing else types)
        u = plain_squash(x * share + self.primary.bias[:, None, None, :]).reshape(b, -1, dim)
        j, d = cfg.num_classes, cfg.class_dim
        w_ijkd = self.classes.weight.view(self.num_inputs, dim, j, d).permute(0, 2, 1, 3)
        votes = torch.matmul(u[:, :, None, None, :], w_ijkd[None]).squeeze(3)  # (B, I, J, D)
        v, c = plain_routing(
            votes, self.classes.bias, cfg.routing_iters, cfg.leaky_routing, cfg.routing_detach
        )
        lengths = torch.sqrt((v * v).sum(-1) + EPS)
        recon = None
        if self.decoder is not None:
            if self.training and labels is not None:
                targets = labels.view(b, -1)
            elif cfg.num_targets == 1:
                targets = lengths.argmax(-1, keepdim=True)
            else:
                targets = lengths.topk(cfg.num_targets, -1).indices.sort(-1).values
            masks = F.one_hot(targets, j).to(v.dtype)  # (B, T, J)
            pixels = self.decoder.net((masks[..., None] * v[:, None]).flatten(2))
            h, w, ch = cfg.image_shape
            recon = pixels.view(b, -1, ch, h, w)
            recon = recon[:, 0] if cfg.num_targets == 1 else recon
        return lengths, v, c, recon


def build_pair(overrides, dtype=torch.float64, seed=0):
    cfg = load_config(["configs/debug_cpu.yaml"], overrides)
    torch.manual_seed(seed)
    fast = build_model(cfg.model).to(dtype)
    plain = PlainCapsNet(cfg.model).to(dtype)
    plain.load_state_dict(fast.state_dict(), strict=True)
    return cfg, fast, plain


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
}


def test_fused_cpu_routing_builds_here():
    """The fused C++ passes build on this machine (else every run warns and routes on torch
    ops, and the tests below would check only one path)."""
    assert cpu_kernels() is not None


@pytest.mark.parametrize("fused", [True, False], ids=["fused_cpu", "torch_ops"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_capsnet_equals_plain_reference_values_and_gradients(variant, fused):
    cfg, fast, plain = build_pair([*VARIANTS[variant], f"model.fused_routing={fused}"])
    h, w, c = cfg.model.image_shape
    torch.manual_seed(1)
    images = torch.rand(5, c, h, w, dtype=torch.float64)
    labels = torch.randint(0, 10, (5, cfg.model.num_targets)).squeeze(1)
    if cfg.model.num_targets == 2:
        labels = torch.stack([torch.tensor([0, 1]) + k for k in range(5)])

    out = fast(images, labels)
    lengths, poses, coupling, recon = plain(images, labels)
    assert out.coupling.shape == coupling.shape == (5, fast.primary.num_capsules(), 10)
    for name, got, want in [
        ("lengths", out.lengths, lengths),
        ("poses", out.poses, poses),
        ("coupling", out.coupling, coupling),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)
    if recon is None:
        assert out.reconstruction is None
    else:
        torch.testing.assert_close(out.reconstruction, recon, rtol=1e-9, atol=1e-11)

    # Gradients of the training loss (margin + reconstruction) and of a term on the couplings
    # (nothing in training uses them, but the fast backward must still be right for them).
    targets = images if cfg.model.num_targets == 1 else torch.stack([images, images], 1)
    loss_fast, _ = compute_loss(out, labels, targets, cfg.loss)
    loss_fast = loss_fast + (out.coupling**2).sum() * 0.1
    out_plain = type(out)(lengths=lengths, reconstruction=recon, poses=poses, coupling=coupling)
    loss_plain, _ = compute_loss(out_plain, labels, targets, cfg.loss)
    loss_plain = loss_plain + (coupling**2).sum() * 0.1
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-10, atol=1e-12)
    loss_fast.backward()
    loss_plain.backward()
    plain_params = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[name].grad, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("iters", [1, 3])
def test_route_equals_plain_routing_with_gradients(leaky, detach, iters):
    torch.manual_seed(2)
    votes = torch.randn(3, 7, 4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weights_v, weights_c = torch.randn(3, 4, 5), torch.randn(3, 7, 4)
    grads = []
    for fn in (route, plain_routing):
        v, c = fn(votes, bias, iters, leaky, detach)
        grads.append(
            (
                v,
                c,
                *torch.autograd.grad((v * weights_v).sum() + (c * weights_c).sum(), (votes, bias)),
            )
        )
    for name, got, want in zip(["v", "c", "grad_votes", "grad_bias"], *grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_cpu", "torch_ops"])
def test_fp32_matches_fp64_reference_to_float_tolerance(fused):
    overrides = ["model.leaky_routing=true", f"model.fused_routing={fused}"]
    cfg, fast, plain = build_pair(overrides, dtype=torch.float32, seed=3)
    plain64 = PlainCapsNet(cfg.model).double()
    plain64.load_state_dict(fast.state_dict())
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8)
    out = fast(images, labels)
    lengths, poses, _, recon = plain64(images.double(), labels)
    torch.testing.assert_close(out.lengths.double(), lengths, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.reconstruction.double(), recon, rtol=1e-4, atol=1e-5)


def test_routing_stays_fp32_under_bf16_autocast():
    cfg, fast, _ = build_pair([], dtype=torch.float32)
    images = torch.rand(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(images, torch.arange(4))
    assert out.poses.dtype == out.coupling.dtype == torch.float32
    reference = fast(images, torch.arange(4))
    # The convolutions ran in bf16, routing in fp32: lengths agree to bf16 precision.
    torch.testing.assert_close(out.lengths, reference.lengths, rtol=0.05, atol=0.02)
    torch.testing.assert_close(
        out.coupling.sum(-1), torch.ones(4, fast.primary.num_capsules()), rtol=1e-5, atol=1e-5
    )


def test_bf16_model_trains_a_step_with_fp32_routing():
    cfg, fast, _ = build_pair([], dtype=torch.bfloat16)
    images, labels = torch.rand(4, 1, 28, 28), torch.arange(4)
    out = fast(images.bfloat16(), labels)
    loss, _ = compute_loss(out, labels, images, cfg.loss)
    loss.backward()
    assert out.poses.dtype == torch.float32
    assert fast.classes.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(fast.classes.weight.grad.float()).all()


def test_channels_last_gives_the_same_model_output():
    cfg, fast, _ = build_pair([], dtype=torch.float32)
    images = torch.rand(3, 1, 28, 28)
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
