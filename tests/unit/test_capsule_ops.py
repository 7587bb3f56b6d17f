"""squash, safe lengths and the class-capsule routing (route_capsules, the one routing of the
model) against values computed by hand, through both routing passes (fused C++ and torch ops)."""

import math

import pytest
import torch

from capsdist.models.layers import safe_norm, squash
from capsdist.models.routing import route_capsules

PASSES = pytest.mark.parametrize("fused", [True, False], ids=["fused_cpu", "torch_ops"])


def random_layer(b=2, i=6, k=3, j=3, d=4, dtype=torch.float32, seed=0):
    """Inputs u (B, I, Din), weights W (I, Din, J·D) and bias (J, D) of a class-capsule layer."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, i, k, generator=gen, dtype=dtype)
    weight = torch.randn(i, k, j * d, generator=gen, dtype=dtype)
    bias = torch.randn(j, d, generator=gen, dtype=dtype)
    return u, weight, bias


def votes_of(u, weight, num_classes):
    i, k, n = weight.shape
    return torch.einsum("bik,ikjd->bijd", u, weight.view(i, k, num_classes, n // num_classes))


def test_squash_matches_formula_by_hand():
    s = torch.tensor([[3.0, 4.0]])  # ‖s‖ = 5 → scale 25/26, direction (0.6, 0.8)
    expected = torch.tensor([[25 / 26 * 0.6, 25 / 26 * 0.8]])
    torch.testing.assert_close(squash(s), expected)


def test_squash_keeps_direction_and_maps_lengths_below_one():
    s = torch.randn(64, 16, dtype=torch.float64) * torch.logspace(-2, 3, 64)[:, None]
    v = squash(s)
    lengths = v.norm(dim=-1)
    assert (lengths < 1).all() and (lengths > 0).all()
    torch.testing.assert_close(v / lengths[:, None], s / s.norm(dim=-1, keepdim=True))


def test_squash_and_length_are_finite_at_zero_vector():
    s = torch.zeros(2, 8, requires_grad=True)
    v = squash(s)
    length = safe_norm(v)
    length.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(length).all()
    assert torch.isfinite(s.grad).all()
    assert v.abs().max() == 0


def test_safe_norm_matches_norm_away_from_zero():
    x = torch.randn(10, 16)
    torch.testing.assert_close(safe_norm(x), x.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert math.isclose(float(safe_norm(torch.zeros(3))), math.sqrt(1e-9), rel_tol=1e-3)


@PASSES
def test_coupling_softmax_is_over_output_capsules(fused):
    u, weight, bias = random_layer(b=3, i=5, j=10)
    _, c = route_capsules(u, weight, bias, num_iters=3, fused=fused)  # (B, I, J)
    torch.testing.assert_close(c.sum(dim=-1), torch.ones(3, 5))
    assert not torch.allclose(c, torch.full_like(c, 0.1))  # routing moved them off uniform


@PASSES
def test_leaky_coupling_sums_below_one_with_orphan_by_hand(fused):
    u, weight, bias = random_layer(j=4)
    _, c = route_capsules(u, weight, bias, num_iters=1, leaky=True, fused=fused)
    torch.testing.assert_close(c, torch.full((2, 6, 4), 0.2))  # 4 classes + 1 orphan, all zero
    _, c = route_capsules(u, weight, bias, num_iters=3, leaky=True, fused=fused)
    assert (c.sum(-1) < 1).all()


def test_one_routing_iteration_squashes_the_uniformly_coupled_votes():
    u, weight, bias = random_layer()
    v, c = route_capsules(u, weight, bias, num_iters=1)
    # c_ij = 1/J for every input, so s_j = (1/J) Σ_i û_{j|i} + bias_j.
    torch.testing.assert_close(v, squash(votes_of(u, weight, 3).sum(dim=1) / 3 + bias))
    torch.testing.assert_close(c, torch.full((2, 6, 3), 1 / 3))


@PASSES
def test_two_routing_iterations_by_hand(fused):
    # One example, two inputs, two classes, 1-D poses: every step written out.
    # u_i = 1 and W_i = (û_{1|i}, û_{2|i}), so the votes are û = [[1, 0], [1, 2]].
    u = torch.ones(1, 2, 1)
    weight = torch.tensor([[[1.0, 0.0]], [[1.0, 2.0]]])  # (I=2, Din=1, J·D=2)
    bias = torch.zeros(2, 1)
    s1 = torch.tensor([0.5 * 1 + 0.5 * 1, 0.5 * 0 + 0.5 * 2])  # uniform coupling
    v1 = s1 * s1.abs() / (1 + s1**2)  # squash in 1-D: sign · s²/(1+s²)
    b = torch.tensor([[1.0 * v1[0], 0.0 * v1[1]], [1.0 * v1[0], 2.0 * v1[1]]])  # û·v
    c = torch.softmax(b, dim=1)
    s2 = torch.stack(
        [(c[:, 0] * torch.tensor([1.0, 1.0])).sum(), (c[:, 1] * torch.tensor([0.0, 2.0])).sum()]
    )
    v2 = s2 * s2.abs() / (1 + s2**2)
    out, coupling = route_capsules(u, weight, bias, num_iters=2, fused=fused)
    torch.testing.assert_close(out.view(2), v2)
    torch.testing.assert_close(coupling.view(2, 2), c)


@PASSES
@pytest.mark.parametrize("detach", [False, True])
def test_routing_gradients_flow_through_iterations_unless_detached(detach, fused):
    u, weight, bias = random_layer(b=2, i=5, j=3, dtype=torch.float64)
    weight.requires_grad_(True)
    v, c = route_capsules(u, weight, bias, num_iters=3, detach=detach, fused=fused)
    (grad,) = torch.autograd.grad(v.sum(), weight)
    # With detach, the gradient is the one of the last iteration alone, holding the
    # coupling coefficients fixed at their (data-dependent) values.
    weight_last = weight.detach().clone().requires_grad_(True)
    s = torch.einsum("bij,bijd->bjd", c.detach(), votes_of(u, weight_last, 3)) + bias
    (grad_last_only,) = torch.autograd.grad(squash(s).sum(), weight_last)
    assert torch.allclose(grad, grad_last_only, rtol=1e-9, atol=1e-12) == detach
