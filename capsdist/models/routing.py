"""Routing-by-agreement (Sabour et al. 2017, Procedure 1), as the reference's `_update_routing`.

For each input capsule i the coupling coefficients c_ij are a softmax over the OUTPUT capsules j
(several public ports put this softmax on the wrong axis). Gradients flow through every iteration
unless `detach` is set (a popular port's variant, offered as `model.routing_detach`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capsdist.models.capsule_ops import squash


def coupling_coefficients(logits_bij: torch.Tensor, leaky: bool) -> torch.Tensor:
    """c_ij = softmax_j(b_ij). Leaky: an extra all-zero "orphan" logit joins the softmax and its
    column is dropped, so each input's coefficients over the real classes sum to less than 1."""
    if not leaky:
        return F.softmax(logits_bij, dim=-1)
    orphan = torch.zeros_like(logits_bij[..., :1])
    return F.softmax(torch.cat([orphan, logits_bij], dim=-1), dim=-1)[..., 1:]


def route(
    votes_bijd: torch.Tensor,
    bias_jd: torch.Tensor,
    num_iters: int,
    leaky: bool = False,
    detach: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route votes û_{j|i} to output capsules.

    votes_bijd: (B, I, J, D) predictions of each input capsule for each output capsule.
    bias_jd:    (J, D) added to the weighted sum before squashing (as the reference).
    Returns (v_bjd, c_bij): output capsules (B, J, D) of the last iteration and the coupling
    coefficients (B, I, J) that produced them.
    """
    # Routing stays in fp32 under bf16 autocast: the agreement logits accumulate over iterations.
    votes_bijd = votes_bijd.float()
    bias_jd = bias_jd.float()
    logits_bij = votes_bijd.new_zeros(votes_bijd.shape[:3])
    for it in range(num_iters):
        last = it == num_iters - 1
        votes = votes_bijd if (last or not detach) else votes_bijd.detach()
        c_bij = coupling_coefficients(logits_bij, leaky)
        s_bjd = torch.einsum("bij,bijd->bjd", c_bij, votes) + bias_jd
        v_bjd = squash(s_bjd)
        if not last:
            logits_bij = logits_bij + torch.einsum("bijd,bjd->bij", votes, v_bjd)
    return v_bjd, c_bij
