"""The plain PyTorch CapsNet: what a competent user writes from the paper and the reference code.

Two uses: `capsdist bench model --compare-plain` times it as the baseline the fast model must
beat, and tests/unit/test_routing_reference.py checks the fast model against it to fp64 rounding.
So it shares nothing with the fast path (capsnet.py, routing.py, the maths of layers.py) but the
parameter names, which let `load_state_dict` copy a CapsNet's weights into it, and the
ModelOutput container it returns. The votes are one einsum into a (B, I, J, D) tensor; routing is
Procedure 1 of the paper over that tensor (softmax over the classes J) with autograd for the
gradients; TensorFlow's SAME padding is worked out by hand.
Shapes use the legend of layers.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from capsdist.config.schema import ModelConfig
from capsdist.models.layers import ModelOutput

EPS = 1e-9  # inside the square roots, as capsdist's NORM_EPS: finite at the zero vector


def plain_squash(s: torch.Tensor) -> torch.Tensor:
    """Eq. 1 of the paper over the last dim."""
    sq = (s * s).sum(-1, keepdim=True)
    return sq / (1 + sq) * s / torch.sqrt(sq + EPS)


def plain_routing(
    votes: torch.Tensor, bias: torch.Tensor, iters: int, leaky: bool = False, detach: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedure 1 of the paper as the reference's `_update_routing`, autograd only.

    votes (B, I, J, D) û_{j|i}; bias (J, D) added before squashing. Returns (v (B, J, D), c (B, I,
    J)) of the last iteration. leaky: an all-zero orphan logit joins the softmax and its column is
    dropped. detach: every iteration but the last sees the votes detached (a popular port's
    variant); the bias still gets gradients through every iteration.
    """
    b, i, j, _ = votes.shape
    logits = votes.new_zeros(b, i, j)
    for r in range(iters):
        last = r == iters - 1
        u_hat = votes if (last or not detach) else votes.detach()
        if leaky:
            with_orphan = torch.cat([logits.new_zeros(b, i, 1), logits], dim=2)
            c = torch.softmax(with_orphan, dim=2)[:, :, 1:]
        else:
            c = torch.softmax(logits, dim=2)  # over the classes, for each input capsule
        s = torch.einsum("bij,bijd->bjd", c, u_hat) + bias
        v = plain_squash(s)
        if not last:
            logits = logits + torch.einsum("bijd,bjd->bij", u_hat, v)  # agreement û · v
    return v, c


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's SAME padding of (B, C, H, W): the odd pixel goes after (bottom, right)."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: W then H
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class _Primary(nn.Module):
    def __init__(self, c_in: int, types: int, dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, types * dim, kernel, stride=2, bias=False)
        self.bias = nn.Parameter(torch.full((types, dim), 0.1))


class _Classes(nn.Module):
    def __init__(self, n_in: int, d_in: int, classes: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, d_in, classes * d_out))
        nn.init.trunc_normal_(self.weight, std=0.1, a=-0.2, b=0.2)
        self.bias = nn.Parameter(torch.full((classes, d_out), 0.1))


class _Decoder(nn.Module):
    def __init__(self, widths: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1], nn.Sigmoid())


class PlainCapsNet(nn.Module):
    """The reference CapsNet in plain PyTorch, parameters named as capsdist's CapsNet (load its
    state_dict for the same model; a fresh one is initialised roughly, not as the reference)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, w, c = cfg.image_shape
        same = cfg.padding == "SAME"
        h1 = h if same else h - cfg.conv1_kernel + 1
        w1 = w if same else w - cfg.conv1_kernel + 1
        h2 = math.ceil(h1 / 2) if same else (h1 - cfg.primary_kernel) // 2 + 1
        w2 = math.ceil(w1 / 2) if same else (w1 - cfg.primary_kernel) // 2 + 1
        self.num_inputs = cfg.num_prime_capsules * h2 * w2
        self.conv1 = nn.Conv2d(c, cfg.conv1_channels, cfg.conv1_kernel)
        self.primary = _Primary(
            cfg.conv1_channels, cfg.num_prime_capsules, cfg.prime_dim, cfg.primary_kernel
        )
        self.classes = _Classes(self.num_inputs, cfg.prime_dim, cfg.num_classes, cfg.class_dim)
        widths = [cfg.num_classes * cfg.class_dim, *cfg.decoder_hidden, c * h * w]
        self.decoder = _Decoder(widths) if cfg.reconstruction else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """As CapsNet.forward: given labels (B,) or (B, T), the decoder's slot t is masked by
        label t, in training and evaluation; without labels, by the top-T classes, ascending."""
        cfg = self.cfg
        pad = tf_same_pad if cfg.padding == "SAME" else (lambda x, kernel, stride: x)
        x = F.relu(self.conv1(pad(images, cfg.conv1_kernel, 1)))
        x = self.primary.conv(pad(x, cfg.primary_kernel, 2))
        b, _, gh, gw = x.shape
        types, din = cfg.num_prime_capsules, cfg.prime_dim
        x = x.reshape(b, types, din, gh, gw).permute(0, 1, 3, 4, 2)  # (B, types, H, W, Din)
        # The reference's quirk: its primary layer routes one iteration, scaling every vote by
        # softmax(zeros over the types) before the bias (model.primary_scaling=paper: unscaled).
        share = 1.0 / (types + 1 if cfg.leaky_routing else types)
        share = share if cfg.primary_scaling == "reference" else 1.0
        u = plain_squash(x * share + self.primary.bias[:, None, None, :]).reshape(b, -1, din)
        j, d = cfg.num_classes, cfg.class_dim
        w_ikjd = self.classes.weight.view(self.num_inputs, din, j, d)
        votes = torch.einsum("bik,ikjd->bijd", u, w_ikjd)  # (B, I, J, D) û_{j|i} = W_ij u_i
        iters = cfg.routing_iters_in(self.training)
        v, c = plain_routing(votes, self.classes.bias, iters, cfg.leaky_routing, cfg.routing_detach)
        lengths = torch.sqrt((v * v).sum(-1) + EPS)  # (B, J)
        recon = None
        if self.decoder is not None:
            if labels is not None:
                targets = labels.view(b, -1)  # (B, T), in the order given
            else:
                targets = lengths.topk(cfg.num_targets, -1).indices.sort(-1).values
            masks = F.one_hot(targets, j).to(v.dtype)  # (B, T, J)
            pixels = self.decoder.net((masks[..., None] * v[:, None]).flatten(2))
            h, w, ch = cfg.image_shape
            recon = pixels.view(b, -1, ch, h, w)
            recon = recon[:, 0] if cfg.num_targets == 1 else recon
        return ModelOutput(lengths=lengths, reconstruction=recon, poses=v, coupling=c)
