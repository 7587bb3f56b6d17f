"""`capsdist bench model`: training-step throughput, memory and step time / conv floor.

The floor is the same batch through only conv1 and the primary-capsule conv, forward and
backward (the model's own conv modules, so the same layout and padding): no CapsNet step can be
faster. Step and floor are timed alternately, one of each per round, and the medians reported,
and step_over_conv_bound is the median of the per-round ratios, so that load from other
processes on a shared machine hits both alike.

FLOPs per step are counted analytically (multiply-add = 2 FLOPs), forward:
  conv:    2 · B · Hout · Wout · Cout · Cin · k²                    (conv1, primary conv)
  votes:   2 · B · I · Din · J · D                                  (W_ij u_i, one bmm)
  routing: 2 · B · I · J · D · (2R − 2)  (R−1 weighted sums + R−1 agreements; iteration 1 is
           one GEMM with the cost of the votes, counted once more)
  decoder: 2 · B · Σ n_in · n_out
backward = 2 × forward, except conv1 whose input needs no gradient (1 ×). Elementwise ops
(squash, softmax, Adam) are not counted. TFLOP/s = FLOPs / step time; MFU = that / the device's
dense peak for the precision (GPU only: the table below).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from capsdist.config.schema import Config
from capsdist.distributed import keep_freed_memory, pick_device
from capsdist.errors import UserError
from capsdist.models import build_model, compute_loss
from capsdist.models.layers import conv_output_size
from capsdist.models.plain import PlainCapsNet
from capsdist.models.routing import cpu_kernels
from capsdist.track import ProgressBar

# Dense peak TFLOP/s by (device name fragment, precision), from the vendors' data sheets
# (H100/H200 SXM: fp32 67 without tensor cores, bf16 989 with).
PEAK_TFLOPS = {
    ("H100", "fp32"): 67.0,
    ("H100", "bf16"): 989.0,
    ("H200", "fp32"): 67.0,
    ("H200", "bf16"): 989.0,
    ("A100", "fp32"): 19.5,
    ("A100", "bf16"): 312.0,
}


def run(cfg: Config, args: argparse.Namespace) -> dict:
    if cfg.model.name != "capsnet":
        raise UserError(f"bench model times CapsNets; model.name={cfg.model.name}")
    steps, warmup = getattr(args, "steps", 10), getattr(args, "warmup", 2)
    freed_memory_kept = keep_freed_memory()  # as `capsdist train` does
    optimizer_kind = getattr(args, "optimizer", "fused")
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    device = pick_device()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device).train()
    batch = _random_batch(cfg, device)
    step = _training_step(model, cfg, batch, optimizer_kind)
    floor = _conv_floor(model, batch[0], bf16=cfg.ds.precision == "bf16")
    bar = ProgressBar(total=warmup + steps * (2 if args.compare_plain else 1), desc="bench")
    step_s, floor_s = _timed_rounds(step, floor, warmup, steps, device, bar)
    peak_mb = _peak_memory_mb(device)
    flops = num_step_flops(cfg)
    step_time = statistics.median(step_s)
    result = {
        "images_per_s": round(cfg.train.batch_size / step_time, 2),
        "step_ms": round(step_time * 1e3, 2),
        "peak_mem_mb": round(peak_mb, 1),
        "peak_mem_source": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "resource.getrusage ru_maxrss (whole process)",
        "step_over_conv_bound": _paired_ratio(step_s, floor_s),
        "conv_floor_ms": round(statistics.median(floor_s) * 1e3, 2),
        "step_ms_all": [round(t * 1e3, 1) for t in step_s],
        "flops_per_step": flops,
        "achieved_tflops": round(flops / step_time / 1e12, 4),
        "mfu": _mfu(flops / step_time, device, cfg.ds.precision),
        "config": {
            **_describe(cfg, args, device, optimizer_kind),
            "fused_cpu_routing": device.type == "cpu"
            and cfg.model.fused_routing
            and cpu_kernels() is not None,
            "glibc_keeps_freed_memory": freed_memory_kept,
        },
    }
    if args.compare_plain:
        plain = _plain_model(cfg, model).to(device).train()
        plain_step = _training_step(plain, cfg, batch, optimizer_kind)
        plain_s, plain_floor_s = _timed_rounds(plain_step, floor, 0, steps, device, bar)
        plain_time = statistics.median(plain_s)
        result["plain"] = {
            "images_per_s": round(cfg.train.batch_size / plain_time, 2),
            "step_ms": round(plain_time * 1e3, 2),
            "step_over_conv_bound": _paired_ratio(plain_s, plain_floor_s),
        }
        result["speedup_vs_plain"] = round(plain_time / step_time, 3)
    bar.close()
    return result


def _random_batch(cfg: Config, device: torch.device):
    h, w, c = cfg.model.image_shape
    b = cfg.train.batch_size
    images = torch.rand(b, c, h, w, device=device)
    labels = torch.randint(0, cfg.model.num_classes, (b, cfg.model.num_targets), device=device)
    if cfg.model.num_targets == 1:
        return images, labels[:, 0], images
    labels[:, 1] = (labels[:, 0] + 1) % cfg.model.num_classes  # two different digits
    return images, labels, torch.stack([images, images], 1)


def _training_step(model, cfg: Config, batch, optimizer_kind: str):
    """Forward, loss, backward, Adam: the work of one capsdist training step."""
    images, labels, targets = batch
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=cfg.train.lr,
        eps=1e-8,
        fused=optimizer_kind == "fused",
        foreach=optimizer_kind == "foreach" or None,
    )
    bf16 = cfg.ds.precision == "bf16"

    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images, labels)
            loss, _ = compute_loss(out, labels, targets, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _conv_floor(model, images: torch.Tensor, bf16: bool):
    """conv1 + primary conv, forward and backward, on the model's own modules (and layout), in
    the step's precision (under bf16 autocast for bf16, as the step runs them)."""
    conv1, primary = model.conv1, model.primary.conv

    def floor() -> None:
        x = images
        if getattr(model, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = primary(conv1(x))
        out.backward(torch.ones_like(out))
        for p in (conv1.weight, conv1.bias, primary.weight):
            p.grad = None

    return floor


def _timed_rounds(step, floor, warmup, rounds, device, bar):
    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
        floor()
        bar.update()
    step_s, floor_s = [], []
    for _ in range(rounds):
        step_s.append(timed(step))
        floor_s.append(timed(floor))
        bar.update()
    return step_s, floor_s


def _paired_ratio(step_s: list[float], floor_s: list[float]) -> float:
    """Median over rounds of step / floor timed back to back: robust to load that changes
    between rounds (a shared machine), unlike a ratio of two medians."""
    return round(statistics.median(s / f for s, f in zip(step_s, floor_s, strict=True)), 3)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def num_step_flops(cfg: Config) -> int:
    """Analytic FLOPs of one training step (forward + backward), see the module docstring."""
    m, b = cfg.model, cfg.train.batch_size
    h, w, c = m.image_shape
    h1, w1 = (conv_output_size(s, m.conv1_kernel, 1, m.padding) for s in (h, w))
    h2, w2 = (conv_output_size(s, m.primary_kernel, 2, m.padding) for s in (h1, w1))
    conv1 = 2 * b * h1 * w1 * m.conv1_channels * c * m.conv1_kernel**2
    primary_out = m.num_prime_capsules * m.prime_dim
    primary = 2 * b * h2 * w2 * primary_out * m.conv1_channels * m.primary_kernel**2
    i = m.num_prime_capsules * h2 * w2
    votes = 2 * b * i * m.prime_dim * m.num_classes * m.class_dim
    routing = 2 * b * i * m.num_classes * m.class_dim * (2 * m.routing_iters - 2)
    first_iteration = votes if m.routing_iters > 1 else 0
    decoder = 0
    if m.reconstruction:
        widths = [m.num_classes * m.class_dim, *m.decoder_hidden, h * w * c]
        decoder = (
            2 * b * m.num_targets * sum(a * z for a, z in zip(widths[:-1], widths[1:], strict=True))
        )
    forward = conv1 + primary + votes + first_iteration + routing + decoder
    return int(forward + 2 * (forward - conv1) + conv1)


def _mfu(flops_per_s: float, device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None  # no meaningful dense peak for a shared CPU
    name = torch.cuda.get_device_name()
    for (fragment, prec), peak in PEAK_TFLOPS.items():
        if fragment in name and prec == precision:
            return round(flops_per_s / (peak * 1e12), 4)
    return None


def _describe(cfg: Config, args, device: torch.device, optimizer_kind: str) -> dict:
    return {
        "files": list(args.config),
        "overrides": list(getattr(args, "overrides", [])),
        "batch_size": cfg.train.batch_size,
        "precision": cfg.ds.precision,
        "routing_iters": cfg.model.routing_iters,
        "compile": cfg.model.compile,
        "channels_last": cfg.model.channels_last,
        "optimizer": f"torch.optim.Adam({optimizer_kind})",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _plain_model(cfg: Config, fast):
    """The plain reference CapsNet (capsdist/models/plain.py), with the fast model's weights."""
    plain = PlainCapsNet(cfg.model)
    plain.load_state_dict(fast.state_dict())
    return plain
