"""Routing-by-agreement (Sabour et al. 2017, Procedure 1), as the reference's `_update_routing`.

For each input capsule i the coupling coefficients c_ij are a softmax over the OUTPUT capsules j
(several public ports put this softmax on the wrong axis). Gradients flow through every iteration
unless `detach` is set (a popular port's variant, offered as `model.routing_detach`).

Why it is written by hand (issue 6): routing is memory-bound. The votes û (B, I, J, D) are the
one large tensor (47 MB for MNIST at batch 64); everything else is small. So
- the votes are written once, by one batched matmul with I as the batch dim, and every weighted
  sum s_j = Σ_i c_ij û_j|i and agreement û_j|i · v_j reads them through a (N = B·J, I, D) view as a
  batched matrix-vector product: one pass each, no (B, I, J, D) temporaries;
- the first iteration's couplings are uniform, so its weighted sum is one GEMM on the inputs
  (Σ_i W_i u_i / J) and needs no pass over the votes (routing_iters=1 never builds them at all);
- the backward pass is explicit: the votes' gradient Σ_r c_r ⊗ g_s_r + g_a_r ⊗ v_r is one bmm
  with 2R − 2 rank-1 terms, written once (autograd writes and adds a full-size tensor per use).
On CPU (`model.fused_routing`, default) each iteration is instead one C++ pass over the votes
(routing_cpu.cpp: agreement, softmax and weighted sum while a capsule's votes are in cache; the
backward likewise, writing the votes' gradient straight into the bmm's layout): the step-time
share of routing measured 100 → 65 ms at batch 64. The torch ops above stay for GPUs and for
machines without a C++ compiler.
Routing runs in fp32 whatever the inputs' dtype (bf16 autocast included): the agreement logits
accumulate over iterations. This is the one routing of training, evaluation and the tests;
tests/unit/test_routing_reference.py checks its values and gradients, both passes, against the
plain autograd model of plain.py. Shapes use the legend of layers.py.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from capsdist.extensions import build_lock, cpu_feature_key
from capsdist.models.layers import squash

CPU_KERNELS_SOURCE = Path(__file__).with_name("routing_cpu.cpp")
CPU_KERNELS_NAME = "capsdist_routing_cpu"


def cpu_kernels_name() -> str:
    """The kernels' extension name, one per CPU kind: they are built with -march=native into a
    cache that a cluster's nodes may share, and a binary built for another CPU generation can
    crash this one with an illegal instruction."""
    return f"{CPU_KERNELS_NAME}_{cpu_feature_key()}"


@functools.cache
def cpu_kernels():
    """The fused CPU passes of routing_cpu.cpp, built on first use with torch's JIT extension
    loader and cached (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR) under capsdist's
    build lock (a build killed half-way never blocks later ones: capsdist/extensions.py); None
    (with one warning) where no C++ compiler or build tool is available: routing then runs on
    torch ops, which give the same results, slower."""
    try:
        from torch.utils.cpp_extension import load

        name = cpu_kernels_name()
        with build_lock(name):
            return load(
                name=name,
                sources=[str(CPU_KERNELS_SOURCE)],
                # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header.
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
    except Exception as err:  # no compiler, no ninja, a read-only cache, ...
        warnings.warn(
            f"fused CPU routing unavailable, using torch ops (slower): {err!r:.300}",
            stacklevel=2,
        )
        return None


def _softmax_classes(logits_bji: torch.Tensor, leaky: bool) -> torch.Tensor:
    """c_ij = softmax over the classes (dim 1 of (B, J, I)). Leaky: an extra all-zero "orphan"
    logit joins the softmax and its column is dropped, so each input's coefficients over the
    real classes sum to less than 1."""
    if not leaky:
        return F.softmax(logits_bji, dim=1)
    orphan = torch.zeros_like(logits_bji[:, :1])
    full = F.softmax(torch.cat([orphan, logits_bji], dim=1), dim=1)
    return full[:, 1:].contiguous()


def routing_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (fp64 stays fp64, for tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def uniform_share(num_classes: int, leaky: bool) -> float:
    """The first iteration's coupling coefficient: softmax of all-zero logits."""
    return 1.0 / (num_classes + 1 if leaky else num_classes)


def route_capsules(
    u_bik: torch.Tensor,
    weight_ikn: torch.Tensor,
    bias_jd: torch.Tensor,
    num_iters: int,
    leaky: bool = False,
    detach: bool = False,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Votes û_{j|i} = W_ij u_i and routing in one step (the class-capsule layer).

    u_bik: (B, I, Din) input capsules; weight_ikn: (I, Din, J·D); bias_jd: (J, D).
    Returns v_bjd (B, J, D), the output capsules of the last iteration, and c_bij (B, I, J), the
    coupling coefficients that produced them; fp32 whatever the inputs (fp64 for fp64 inputs).
    fused: on CPU, run iterations 2..R with the C++ passes of routing_cpu.cpp (same results).
    """
    kernels = cpu_kernels() if fused and u_bik.device.type == "cpu" and num_iters > 1 else None
    return _RouteCapsules.apply(u_bik, weight_ikn, bias_jd, num_iters, leaky, detach, kernels)


# ---- the routing loop, shared by both implementations of one iteration ------------------------


@dataclass
class _Trace:
    """What the backward pass needs from each iteration r = 0..R-1."""

    s: list[torch.Tensor] = field(default_factory=list)  # (B, J, D) pre-squash sums
    v: list[torch.Tensor] = field(default_factory=list)  # (B, J, D) squashed outputs
    c: list[torch.Tensor] = field(default_factory=list)  # (B, J, I) couplings, r >= 1


def _route_forward(passes, s0_bjd, bias_jd, num_iters):
    """Iterations 1..R-1 after the first (whose sum s0 includes the bias), traced."""
    trace = _Trace(s=[s0_bjd], v=[squash(s0_bjd)])
    logits_bji = None
    for _ in range(1, num_iters):
        c_bji, sum_bjd, logits_bji = passes.forward(trace.v[-1], logits_bji)
        s_bjd = sum_bjd + bias_jd
        trace.s.append(s_bjd)
        trace.v.append(squash(s_bjd))
        trace.c.append(c_bji)
    return trace


def _squash_backward(s: torch.Tensor, grad_v: torch.Tensor) -> torch.Tensor:
    # Small (B, J, D) tensors: let autograd differentiate the very squash the forward used.
    with torch.enable_grad():
        s = s.detach().requires_grad_(True)
        (grad_s,) = torch.autograd.grad(squash(s), s, grad_v)
    return grad_s


def _route_backward(passes, trace, grad_v, grad_c_bji, detach):
    """Returns (grad_votes in the passes' layout, or None; grad_s0 (B, J, D); grad_bias (J, D)).

    grad_s0 is the gradient of the first iteration's sum; its path to the votes (uniform
    couplings) is left to the caller. With `detach` only the last iteration reaches the votes;
    the bias still receives gradients through every iteration, as with autograd.
    """
    num_iters = len(trace.s)
    p_cols: list[torch.Tensor] = []  # (B, J, I) coefficients of rank-1 terms of grad_votes
    q_rows: list[torch.Tensor] = []  # (B, J, D) their pose-space factors
    grad_logits = None  # running Σ of the softmax gradients of the later iterations
    grad_bias = torch.zeros_like(grad_v[0])
    for r in reversed(range(num_iters)):
        grad_s = _squash_backward(trace.s[r], grad_v)
        grad_bias = grad_bias + grad_s.sum(0)
        if r == 0:
            break
        last = r == num_iters - 1
        c_bji = trace.c[r - 1]
        if last or not detach:
            p_cols.append(c_bji)
            q_rows.append(grad_s)
        extra = grad_c_bji if last else None
        grad_v, grad_logits = passes.backward(c_bji, grad_s, extra, grad_logits)
        if not detach:
            p_cols.append(grad_logits)
            q_rows.append(trace.v[r - 1])
    grad_votes = passes.votes_grad(p_cols, q_rows) if p_cols else None
    return grad_votes, grad_s, grad_bias


class _TorchPasses:
    """One routing iteration over the votes with torch ops (any device). votes_nid: a
    (N = B·J, I, D) view of the votes (contiguous or strided); couplings and logits are kept as
    (B, J, I) so that `.view(N, 1, I)` feeds bmm directly."""

    def __init__(self, votes_nid: torch.Tensor, leaky: bool):
        self.votes, self.leaky = votes_nid, leaky

    def forward(self, v_bjd, logits_bji):
        """(couplings, Σ_i c û before the bias, logits) of the next iteration."""
        b, j, d = v_bjd.shape
        n, i, _ = self.votes.shape
        agree_bji = torch.bmm(self.votes, v_bjd.reshape(n, d, 1)).view(b, j, i)  # û · v
        logits_bji = agree_bji if logits_bji is None else logits_bji + agree_bji
        c_bji = _softmax_classes(logits_bji, self.leaky)
        sum_bjd = torch.bmm(c_bji.view(n, 1, i), self.votes).view(b, j, d)
        return c_bji, sum_bjd, logits_bji

    def backward(self, c_bji, grad_s, grad_c_extra, grad_logits):
        """(gradient of the previous iteration's output, running Σ of the logits' gradients)."""
        b, j, d = grad_s.shape
        n, i, _ = self.votes.shape
        grad_c = torch.bmm(self.votes, grad_s.reshape(n, d, 1)).view(b, j, i)
        if grad_c_extra is not None:
            grad_c = grad_c + grad_c_extra
        # softmax backward over the classes; the leaky orphan column drops out of the formula.
        grad_x = c_bji * (grad_c - (c_bji * grad_c).sum(1, keepdim=True))
        grad_logits = grad_x if grad_logits is None else grad_logits + grad_x
        # logits after iteration r-1 include the agreement û · v_{r-1}: its gradient is grad_logits.
        grad_v = torch.bmm(grad_logits.view(n, 1, i), self.votes).view(b, j, d)
        return grad_v, grad_logits

    def votes_grad(self, p_cols, q_rows):
        """Σ_k p_k ⊗ q_k as one bmm, written once: (B, J, I, D)."""
        n, i, d = self.votes.shape
        b, j = q_rows[0].shape[:2]
        k = len(p_cols)
        p_nik = torch.stack(p_cols, dim=-1).view(n, i, k)
        q_nkd = torch.stack(q_rows, dim=2).view(n, k, d)
        return torch.bmm(p_nik, q_nkd).view(b, j, i, d)


class _FusedPasses:
    """The same iteration as one C++ pass over the votes (CPU, routing_cpu.cpp). votes_ibjd:
    (I, B, J, D) contiguous, as the votes' bmm writes them; the kernels update the logits and
    their gradients in place."""

    def __init__(self, kernels, votes_ibjd: torch.Tensor, leaky: bool):
        self.kernels, self.votes, self.leaky = kernels, votes_ibjd, leaky

    def forward(self, v_bjd, logits_bji):
        if logits_bji is None:
            i, b, j, _ = self.votes.shape
            logits_bji = v_bjd.new_zeros(b, j, i)
        c_bji, sum_bjd = self.kernels.route_forward(self.votes, v_bjd, logits_bji, self.leaky)
        return c_bji, sum_bjd, logits_bji

    def backward(self, c_bji, grad_s, grad_c_extra, grad_logits):
        # The caller may keep the previous running sum (a rank-1 term): update a copy in place.
        grad_logits = torch.zeros_like(c_bji) if grad_logits is None else grad_logits.clone()
        extra = grad_s.new_empty(0) if grad_c_extra is None else grad_c_extra.contiguous()
        grad_v = self.kernels.route_backward(
            self.votes, c_bji, grad_s.contiguous(), extra, grad_logits
        )
        return grad_v, grad_logits

    def votes_grad(self, p_cols, q_rows):
        """Σ_k p_k ⊗ q_k written straight into the votes' layout: (I, B, J, D)."""
        return self.kernels.route_votes_grad(p_cols, q_rows)


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class _RouteCapsules(torch.autograd.Function):
    """Votes from (u, W) and routing; the votes exist only inside this function, laid out
    (I, B, J, D) as the batched matmul writes them."""

    @staticmethod
    def forward(ctx, u_bik, weight_ikn, bias_jd, num_iters, leaky, detach, kernels):
        b, i, k = u_bik.shape
        j, d = bias_jd.shape
        share = uniform_share(j, leaky)
        with _no_autocast(u_bik.device.type):
            dtype = routing_dtype(u_bik)
            u, weight, bias = u_bik.to(dtype), weight_ikn.to(dtype), bias_jd.to(dtype)
            # Iteration 1: Σ_i c û = share · Σ_i W_i u_i, one (B, I·Din) × (I·Din, J·D) GEMM.
            s0 = (u.reshape(b, i * k) @ weight.reshape(i * k, j * d)).view(b, j, d)
            s0 = s0 * share + bias
            votes_ibn = None
            if num_iters > 1:
                votes_ibn = torch.bmm(u.transpose(0, 1), weight)  # (I, B, J·D): the one pass
            passes = None
            if kernels is not None:
                passes = _FusedPasses(kernels, votes_ibn.view(i, b, j, d), leaky)
            elif votes_ibn is not None:
                passes = _TorchPasses(votes_ibn.view(i, b * j, d).transpose(0, 1), leaky)
            trace = _route_forward(passes, s0, bias, num_iters)
        ctx.trace, ctx.share, ctx.detach, ctx.passes = trace, share, detach, passes
        ctx.dtypes = (u_bik.dtype, weight_ikn.dtype, bias_jd.dtype)
        ctx.save_for_backward(u, weight)
        ctx.set_materialize_grads(False)
        coupling = trace.c[-1] if trace.c else u.new_full((b, j, i), share)
        return trace.v[-1], coupling.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_v, grad_c_bij):
        u, weight = ctx.saved_tensors  # fp32 (B, I, Din), (I, Din, J·D)
        b, i, k = u.shape
        j, d = ctx.trace.s[0].shape[1:]
        if grad_v is None:
            grad_v = u.new_zeros(b, j, d)
        grad_c = None if grad_c_bij is None else grad_c_bij.transpose(1, 2)
        with _no_autocast(u.device.type):
            grad_u = torch.zeros_like(u)
            grad_w = torch.zeros_like(weight)
            grad_votes, grad_s0, grad_bias = _route_backward(
                ctx.passes, ctx.trace, grad_v, grad_c, ctx.detach
            )
            grad_ibn = None
            if isinstance(ctx.passes, _FusedPasses) and grad_votes is not None:
                grad_ibn = grad_votes.view(i, b, j * d)  # already in the bmm's layout
            elif grad_votes is not None:
                # One copy into the (I, B, J·D) layout of the votes' bmm. (Reading the (B, J,
                # I, D) gradient in place, one class at a time through strided (I, B, D) views,
                # avoids the copy but measured 3x slower: each 64-byte row is a cache-line jump.)
                grad_ibn = grad_votes.permute(2, 0, 1, 3).reshape(i, b, j * d)
            if len(ctx.trace.s) == 1 or not ctx.detach:
                g0 = grad_s0.reshape(b, j * d) * ctx.share  # (B, J·D)
                grad_u += (g0 @ weight.reshape(i * k, j * d).t()).view(b, i, k)
                grad_w += (u.reshape(b, i * k).t() @ g0).view(i, k, j * d)
            if grad_ibn is not None:
                grad_w += torch.bmm(u.permute(1, 2, 0), grad_ibn)  # (I, Din, B) @ (I, B, J·D)
                grad_u += torch.bmm(grad_ibn, weight.transpose(1, 2)).transpose(0, 1)
        u_dtype, w_dtype, b_dtype = ctx.dtypes
        grads = grad_u.to(u_dtype), grad_w.to(w_dtype), grad_bias.to(b_dtype)
        return *grads, None, None, None, None
