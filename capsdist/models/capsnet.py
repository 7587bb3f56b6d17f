"""The CapsNet of Sabour et al. 2017, laid out as the reference code (models/capsule_model.py).

conv1 (9x9, ReLU) → primary capsules (9x9 stride-2 conv, squashed 8-D capsules at every grid
position) → class capsules (a separate 8→16 matrix per input capsule and class, routing by
agreement) → lengths; optional decoder reconstructs the input from the masked class capsules.
Shapes use the legend of layers.py.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from capsdist.config.schema import ModelConfig
from capsdist.models.layers import ModelOutput, TFConv2d, safe_norm, squash
from capsdist.models.routing import route_capsules


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """TensorFlow's truncated_normal: redraw values beyond two standard deviations."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class PrimaryCapsules(nn.Module):
    """Convolutional capsules: one conv to types × Din channels, squashed per capsule.

    The reference runs its routing function here with one iteration and a single input capsule,
    so every vote is scaled by softmax(zeros over the types) = 1/types (1/(types+1) when leaky)
    before the bias [types, Din] is added. We keep that quirk for fidelity (model.primary_scaling
    = reference); `paper` squashes conv + bias unscaled, as the paper describes the layer.
    """

    def __init__(self, in_ch: int, cfg: ModelConfig, in_hw: tuple[int, int]):
        super().__init__()
        self.types, self.dim = cfg.num_prime_capsules, cfg.prime_dim
        self.conv = TFConv2d(
            in_ch, self.types * self.dim, cfg.primary_kernel, 2, cfg.padding, in_hw, bias=False
        )
        self.bias = nn.Parameter(torch.empty(self.types, self.dim))
        reference_scale = 1.0 / (self.types + 1 if cfg.leaky_routing else self.types)
        self.vote_scale = reference_scale if cfg.primary_scaling == "reference" else 1.0
        self.out_hw = self.conv.out_hw

    def num_capsules(self) -> int:
        return self.types * self.out_hw[0] * self.out_hw[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        # reshape, not view: a channels_last conv output is not contiguous (the copy is small).
        out = self.conv(x).reshape(b, self.types, self.dim, *self.out_hw)  # (B, types, Din, H, W)
        out = out.permute(0, 1, 3, 4, 2)  # (B, types, H, W, Din)
        s = out * self.vote_scale + self.bias[:, None, None, :]
        return squash(s).reshape(b, -1, self.dim)  # (B, I, Din), I = types·H·W


class ClassCapsules(nn.Module):
    """Fully connected capsules: W_ij (Din → Dout) for every input i and class j, then routing
    (model.train_routing_iters iterations in training mode and model.eval_routing_iters in
    evaluation mode: ModelConfig.routing_iters_in)."""

    def __init__(self, num_inputs: int, cfg: ModelConfig):
        super().__init__()
        self.num_classes, self.dim = cfg.num_classes, cfg.class_dim
        self.train_iters = cfg.routing_iters_in(training=True)
        self.eval_iters, self.leaky, self.detach, self.fused = (
            cfg.routing_iters_in(training=False),
            cfg.leaky_routing,
            cfg.routing_detach,
            cfg.fused_routing,
        )
        # (I, Din, J·Dout) as the reference: one batched matmul over I computes every vote.
        self.weight = nn.Parameter(
            torch.empty(num_inputs, cfg.prime_dim, self.num_classes * self.dim)
        )
        self.bias = nn.Parameter(torch.empty(self.num_classes, self.dim))

    def forward(self, u_bid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_bjd, c_bij); the (B, I, J, D) votes exist only inside routing (see routing.py)."""
        iters = self.train_iters if self.training else self.eval_iters
        return route_capsules(
            u_bid, self.weight, self.bias, iters, self.leaky, self.detach, self.fused
        )


class Decoder(nn.Module):
    """Reconstruct the input from the class capsules, all but one masked to zero."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, w, c = cfg.image_shape
        self.image_chw = (c, h, w)
        widths = [cfg.num_classes * cfg.class_dim, *cfg.decoder_hidden, c * h * w]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers[-1] = nn.Sigmoid()
        self.net = nn.Sequential(*layers)

    def forward(self, poses_bjd: torch.Tensor, targets_bt: torch.Tensor) -> torch.Tensor:
        """poses (B, J, D), targets (B, T) class indices → (B, T, C, H, W), one image per target."""
        num_classes = poses_bjd.shape[1]
        mask_btj = F.one_hot(targets_bt, num_classes).to(poses_bjd.dtype)
        masked = mask_btj[..., None] * poses_bjd[:, None]  # (B, T, J, D)
        # Routing returns fp32 poses; a bf16 decoder (DeepSpeed bf16) takes its own dtype.
        pixels = self.net(masked.flatten(2).to(self.net[0].weight.dtype))  # (B, T, C·H·W)
        return pixels.view(*targets_bt.shape, *self.image_chw)


class CapsNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, w, c = cfg.image_shape
        self.num_targets = cfg.num_targets
        self.channels_last = cfg.channels_last
        self.conv1 = TFConv2d(c, cfg.conv1_channels, cfg.conv1_kernel, 1, cfg.padding, (h, w))
        self.primary = PrimaryCapsules(cfg.conv1_channels, cfg, self.conv1.out_hw)
        if min(self.primary.out_hw) < 1:
            raise ValueError(
                f"model.image_shape {cfg.image_shape} is too small for {cfg.padding} padding "
                f"with kernels {cfg.conv1_kernel} and {cfg.primary_kernel}"
            )
        self.classes = ClassCapsules(self.primary.num_capsules(), cfg)
        self.decoder = Decoder(cfg) if cfg.reconstruction else None
        self.reset_parameters()
        # A plain attribute, not a wrapper module: state_dict keys (checkpoints) stay the same.
        self._compiled = torch.compile(self._forward) if cfg.compile else None

    def reset_parameters(self) -> None:
        """The reference's initialisation: truncated normal (conv1 0.05, others 0.1), biases 0.1.
        (W with std 0.01 trains ~50 batches without learning: the init matters.)"""
        truncated_normal_(self.conv1.weight, 0.05)
        truncated_normal_(self.primary.conv.weight, 0.1)
        truncated_normal_(self.classes.weight, 0.1)
        nn.init.constant_(self.conv1.bias, 0.1)
        nn.init.constant_(self.primary.bias, 0.1)
        nn.init.constant_(self.classes.bias, 0.1)
        for layer in self.decoder.net if self.decoder else []:
            if isinstance(layer, nn.Linear):
                truncated_normal_(layer.weight, 0.1)
                nn.init.constant_(layer.bias, 0.1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """images (B, C, H, W) in [0, 1] → ModelOutput.

        labels (B,) or (B, T), when given, mask the decoder in training AND evaluation, in their
        given order: reconstruction slot t is decoded from the capsule of label t (the reference's
        remake uses the true label in both modes, so its eval loss is ours). Without labels
        (figures, unlabelled inputs) the decoder is masked by `predictions(T)`, ascending.
        """
        if self._compiled is not None:
            try:
                return self._compiled(images, labels)
            except torch._dynamo.exc.TorchDynamoException as err:
                # No C++ compiler, an unsupported backend, ...: the eager model is the same model.
                warnings.warn(
                    f"model.compile=true: torch.compile failed, running eager ({err!r:.300})",
                    stacklevel=2,
                )
                self._compiled = None
        return self._forward(images, labels)

    def _forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> ModelOutput:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # In-place ReLU: conv1's backward needs its input, not its output (saves a 26 MB write).
        u_bid = self.primary(F.relu(self.conv1(images), inplace=True))
        v_bjd, c_bij = self.classes(u_bid)
        out = ModelOutput(lengths=safe_norm(v_bjd, dim=-1), poses=v_bjd, coupling=c_bij)
        if self.decoder is not None:
            if labels is not None:  # (B, T) in the order given: slot t pairs with target t
                targets_bt = labels.view(labels.shape[0], -1)
            else:
                targets_bt = out.predictions(self.num_targets).view(images.shape[0], -1)
            recon = self.decoder(v_bjd, targets_bt)
            out.reconstruction = recon[:, 0] if self.num_targets == 1 else recon
        return out
