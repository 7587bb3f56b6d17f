"""squash, safe lengths and routing against values computed by hand."""

import math

import pytest
import torch

from capsdist.models.capsule_ops import safe_norm, squash
from capsdist.models.routing import coupling_coefficients, route


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


def test_coupling_softmax_is_over_output_capsules():
    logits_bij = torch.randn(3, 5, 10)
    c = coupling_coefficients(logits_bij, leaky=False)
    torch.testing.assert_close(c.sum(dim=-1), torch.ones(3, 5))


def test_leaky_coupling_sums_below_one_with_orphan_by_hand():
    c = coupling_coefficients(torch.zeros(1, 1, 4), leaky=True)
    torch.testing.assert_close(c, torch.full((1, 1, 4), 0.2))  # 4 classes + 1 orphan, all zero
    assert (coupling_coefficients(torch.randn(2, 7, 10), leaky=True).sum(-1) < 1).all()


def test_one_routing_iteration_squashes_the_uniformly_coupled_votes():
    votes = torch.randn(2, 6, 3, 4)
    bias = torch.randn(3, 4)
    v, c = route(votes, bias, num_iters=1)
    # c_ij = 1/J for every input, so s_j = (1/J) Σ_i û_{j|i} + bias_j.
    torch.testing.assert_close(v, squash(votes.sum(dim=1) / 3 + bias))
    torch.testing.assert_close(c, torch.full((2, 6, 3), 1 / 3))


def test_two_routing_iterations_by_hand():
    # One example, two inputs, two classes, 1-D poses: every step written out.
    votes = torch.tensor([[[[1.0], [0.0]], [[1.0], [2.0]]]])  # (B=1, I=2, J=2, D=1)
    bias = torch.zeros(2, 1)
    s1 = torch.tensor([0.5 * 1 + 0.5 * 1, 0.5 * 0 + 0.5 * 2])  # uniform coupling
    v1 = s1 * s1.abs() / (1 + s1**2)  # squash in 1-D: sign · s²/(1+s²)
    b = torch.tensor([[1.0 * v1[0], 0.0 * v1[1]], [1.0 * v1[0], 2.0 * v1[1]]])  # û·v
    c = torch.softmax(b, dim=1)
    s2 = torch.stack(
        [(c[:, 0] * torch.tensor([1.0, 1.0])).sum(), (c[:, 1] * torch.tensor([0.0, 2.0])).sum()]
    )
    v2 = s2 * s2.abs() / (1 + s2**2)
    out, coupling = route(votes, bias, num_iters=2)
    torch.testing.assert_close(out.view(2), v2)
    torch.testing.assert_close(coupling.view(2, 2), c)


@pytest.mark.parametrize("detach", [False, True])
def test_routing_gradients_flow_through_iterations_unless_detached(detach):
    votes = torch.randn(2, 5, 3, 4, requires_grad=True)
    v, _ = route(votes, torch.zeros(3, 4), num_iters=3, detach=detach)
    (grad,) = torch.autograd.grad(v.sum(), votes)
    votes_last = votes.detach().clone().requires_grad_(True)
    # With detach, the gradient is the one of the last iteration alone, holding the
    # coupling coefficients fixed at their (data-dependent) values.
    _, c = route(votes.detach(), torch.zeros(3, 4), num_iters=3)
    s = torch.einsum("bij,bijd->bjd", c, votes_last)
    (grad_last_only,) = torch.autograd.grad(squash(s).sum(), votes_last)
    assert torch.allclose(grad, grad_last_only, atol=1e-6) == detach


def test_safe_norm_matches_norm_away_from_zero():
    x = torch.randn(10, 16)
    torch.testing.assert_close(safe_norm(x), x.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert math.isclose(float(safe_norm(torch.zeros(3))), math.sqrt(1e-9), rel_tol=1e-3)
