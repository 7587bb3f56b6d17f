"""`capsdist bench model`: training-step throughput, memory, step time / conv floor and MFU.

The step timed is the one `capsdist train` runs: `train_step` (capsdist/train/step.py) on a
DeepSpeed engine built by the same functions as training's (`build_deepspeed_config`,
`build_engine`: ZeRO stage, ds.precision, the fused Adam and LR schedule), on one random
batch kept on the device. So bf16 here is DeepSpeed's bf16 (bf16 weights and inputs, fp32
master weights), not autocast.

The floor is the same batch through only conv1 and the primary-capsule conv, forward and
backward (the engine's own conv modules, so the same dtype, layout and padding): no CapsNet
step can be faster. Step and floor are timed alternately, one of each per round, and the
medians reported; step_over_conv_bound is the median of the per-round ratios, so that load
from other processes on a shared machine hits both alike.

FLOPs per step are counted analytically (multiply-add = 2 FLOPs), forward:
  conv:    2 · B · Hout · Wout · Cout · Cin · k²                    (conv1, primary conv)
  votes:   2 · B · I · Din · J · D                                  (W_ij u_i, one bmm)
  routing: 2 · B · I · J · D · (2R − 2)  (R−1 weighted sums + R−1 agreements; iteration 1 is
           one GEMM with the cost of the votes, counted once more)
  decoder: 2 · B · Σ n_in · n_out
backward = 2 × forward, except conv1 whose input needs no gradient (1 ×). Elementwise ops
(squash, softmax, Adam) are not counted. TFLOP/s = FLOPs / step time.

MFU (GPU only) = the time the step's FLOPs would take at the device's dense peak for the
precision each part actually runs in, over the measured step time. Parts and precisions: the
convolutions run in TF32 under fp32 when cuDNN allows it (PyTorch's default), the capsule
votes and routing always in fp32 (routing.py keeps them there; TF32 only if the float32
matmul precision was lowered), the decoder like any matmul in fp32 under fp32 and in bf16
under bf16. With one precision this is the usual FLOP/s over peak.
"""

from __future__ import annotations

import argparse
import copy
import gc
import resource
import statistics
import time

import torch

from capsdist.config.schema import Config
from capsdist.data import Batch
from capsdist.distributed import (
    BatchLayout,
    DistEnv,
    build_deepspeed_config,
    build_engine,
    init_process_group,
    keep_freed_memory,
    leave_process_group,
    pick_device,
)
from capsdist.errors import UserError
from capsdist.models import build_model
from capsdist.models.layers import conv_output_size
from capsdist.models.plain import PlainCapsNet
from capsdist.models.routing import cpu_kernels
from capsdist.track import ProgressBar
from capsdist.train.step import train_step

# Dense (no sparsity) peak TFLOP/s by device-name fragment and precision, most specific name
# first. Sources: NVIDIA's data sheets, whose tensor-core figures are "with sparsity": halved
# here. H100 SXM (nvidia.com/en-us/data-center/h100, "H100 SXM" column): FP32 67, TF32 989*,
# BF16/FP16 1,979*. H100 PCIe: 51, 756*, 1,513*. H100 NVL: 60, 835*, 1,671*. H200 SXM
# (nvidia.com/en-us/data-center/h200, "H200 SXM"; torch names it "NVIDIA H200"): 67, 989*,
# 1,979*. H200 NVL: 60, 835*, 1,671*. A100 (SXM and PCIe, A100 data sheet): FP32 19.5, TF32
# 312*, BF16/FP16 624*.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "H100": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5},
    "H200": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
}


def run(cfg: Config, args: argparse.Namespace) -> dict:
    if cfg.model.name != "capsnet":
        raise UserError(f"bench model times CapsNets; model.name={cfg.model.name}")
    steps, warmup = getattr(args, "steps", 10), getattr(args, "warmup", 2)
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    freed_memory_kept = keep_freed_memory()  # as `capsdist train` does
    env = DistEnv.from_environ()
    init_process_group(env)  # DeepSpeed's engine needs one, as in training
    try:
        result = _measure(cfg, args, env, steps, warmup)
    finally:
        leave_process_group()
    result["config"]["glibc_keeps_freed_memory"] = freed_memory_kept
    return result


def _measure(cfg: Config, args, env: DistEnv, steps: int, warmup: int) -> dict:
    device = pick_device(env.local_rank)
    already = _reset_peak_memory(device)  # one process may bench several configs (gpu-check)
    layout = BatchLayout.of(cfg, env.world_size)
    ds_config = build_deepspeed_config(cfg, layout)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()} if args.compare_plain else {}
    engine = build_engine(model, cfg, env, ds_config)
    batch = _random_batch(cfg, layout.micro_batch, device)
    step = _engine_step(engine, cfg, batch, layout.accumulation)
    floor = _conv_floor(engine.module, batch.images)
    bar = ProgressBar(total=(warmup + steps) * (2 if args.compare_plain else 1), desc="bench")
    step_s, floor_s = _timed_rounds(step, floor, warmup, steps, device, bar)
    peak_mb = _peak_memory_mb(device, already)
    flops_by_part = num_step_flops_by_part(cfg)
    flops = sum(flops_by_part.values())
    step_time = statistics.median(step_s)
    precisions = part_precisions(cfg.ds.precision, device)
    result = {
        "images_per_s": round(cfg.train.batch_size / step_time, 2),
        "step_ms": round(step_time * 1e3, 2),
        "peak_mem_mb": round(peak_mb, 1),
        "peak_mem_source": "torch.cuda.max_memory_allocated, less what was allocated before"
        if device.type == "cuda"
        else "resource.getrusage ru_maxrss (whole process)",
        "step_over_conv_bound": _paired_ratio(step_s, floor_s),
        "conv_floor_ms": round(statistics.median(floor_s) * 1e3, 2),
        "step_ms_all": [round(t * 1e3, 1) for t in step_s],
        "flops_per_step": flops,
        "flops_by_part": flops_by_part,
        "achieved_tflops": round(flops / step_time / 1e12, 4),
        "mfu": mfu(flops_by_part, precisions, step_time, device_peaks(device)),
        "mfu_precisions": precisions,
        "config": {
            **_describe(cfg, args, device, layout),
            "fused_cpu_routing": device.type == "cpu"
            and cfg.model.fused_routing
            and cpu_kernels() is not None,
        },
    }
    if args.compare_plain:
        plain = PlainCapsNet(cfg.model)
        plain.load_state_dict(initial)  # the same initial weights, in the same engine
        plain_engine = build_engine(plain, cfg, env, ds_config)
        plain_step = _engine_step(plain_engine, cfg, batch, layout.accumulation)
        plain_s, plain_floor_s = _timed_rounds(plain_step, floor, warmup, steps, device, bar)
        plain_time = statistics.median(plain_s)
        result["plain"] = {
            "images_per_s": round(cfg.train.batch_size / plain_time, 2),
            "step_ms": round(plain_time * 1e3, 2),
            "step_over_conv_bound": _paired_ratio(plain_s, plain_floor_s),
        }
        result["speedup_vs_plain"] = round(plain_time / step_time, 3)
    bar.close()
    return result


def _random_batch(cfg: Config, micro_batch: int, device: torch.device) -> Batch:
    """A batch as the reader hands it over: float32 images in [0, 1] on the device."""
    h, w, c = cfg.model.image_shape
    images = torch.rand(micro_batch, c, h, w, device=device)
    labels = torch.randint(
        0, cfg.model.num_classes, (micro_batch, cfg.model.num_targets), device=device
    )
    if cfg.model.num_targets == 1:
        return Batch(images, labels[:, 0])
    labels[:, 1] = (labels[:, 0] + 1) % cfg.model.num_classes  # two different digits
    return Batch(images, labels, torch.stack([images, images], 1))


def _engine_step(engine, cfg: Config, batch: Batch, accumulation: int):
    """One optimizer step of `capsdist train`: `accumulation` micro-steps of train_step."""

    def step() -> None:
        for _ in range(accumulation):
            train_step(engine, batch, cfg.loss)

    return step


def _conv_floor(model, images: torch.Tensor):
    """conv1 + primary conv, forward and backward, on copies of the engine's own modules (their
    dtype and layout: DeepSpeed's bf16 engine holds bf16 weights and takes bf16 inputs)."""
    conv1, primary = _unhooked_copy(model.conv1), _unhooked_copy(model.primary.conv)
    x = images.to(conv1.weight.dtype)
    if getattr(model, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)

    def floor() -> None:
        out = primary(conv1(x))
        out.backward(torch.ones_like(out))
        for p in (conv1.weight, conv1.bias, primary.weight, primary.bias):
            if p is not None:
                p.grad = None

    return floor


def _unhooked_copy(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with fresh parameters of the same values: ZeRO-1/2 hook the engine's own
    parameters, and a backward outside engine.backward would count as a second gradient
    reduction ("Gradient computed twice for this partition")."""
    twin = copy.deepcopy(module)
    for sub in twin.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(param.detach().clone()))
    return twin


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


def _reset_peak_memory(device: torch.device) -> int:
    """Start a new CUDA memory peak; the bytes still allocated (by an earlier run's engine)."""
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_memory_mb(device: torch.device, already: int) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - already) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def num_step_flops_by_part(cfg: Config) -> dict[str, int]:
    """Analytic FLOPs of one training step (forward + backward) by part: `conv` (conv1 and the
    primary conv), `capsules` (votes and routing), `decoder`; see the module docstring."""
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
    # Backward: 2 x forward (input and weight gradients), conv1 1 x (no input gradient).
    return {
        "conv": 2 * conv1 + 3 * primary,
        "capsules": 3 * (votes + first_iteration + routing),
        "decoder": 3 * decoder,
    }


def num_step_flops(cfg: Config) -> int:
    """Analytic FLOPs of one training step (forward + backward), see the module docstring."""
    return sum(num_step_flops_by_part(cfg).values())


def part_precisions(precision: str, device: torch.device) -> dict[str, str]:
    """The arithmetic each part of the step runs in under ds.precision, as PyTorch is set now
    (on a GPU: cuDNN's TF32 switch for convolutions, the float32 matmul precision)."""
    gpu = device.type == "cuda"
    tf32_matmul = gpu and torch.get_float32_matmul_precision() != "highest"
    matmul = "tf32" if tf32_matmul else "fp32"
    if precision == "fp32":
        conv = "tf32" if gpu and _cudnn_conv_tf32() else "fp32"
        return {"conv": conv, "capsules": matmul, "decoder": matmul}
    # DeepSpeed bf16/fp16: the convolutions and the decoder run in it; routing (the votes
    # included) casts to fp32 whatever its input (capsdist/models/routing.py).
    return {"conv": precision, "capsules": matmul, "decoder": precision}


def _cudnn_conv_tf32() -> bool:
    conv = getattr(torch.backends.cudnn, "conv", None)  # torch >= 2.9's per-op setting
    setting = getattr(conv, "fp32_precision", None)
    if setting in ("tf32", "ieee"):
        return setting == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def peak_tflops(device_name: str) -> dict[str, float] | None:
    """The dense peaks (TFLOP/s by precision) of a GPU, by its torch name; None if unknown."""
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in device_name:
            return peaks
    return None


def mfu(
    flops_by_part: dict[str, int],
    precisions: dict[str, str],
    step_s: float,
    peaks: dict[str, float] | None,
) -> float | None:
    """Model FLOPs utilisation: the time the step's FLOPs would take at the peak (TFLOP/s) of
    each part's precision, over the measured step time; None without peaks."""
    if peaks is None:
        return None
    ideal_s = sum(f / (peaks[precisions[part]] * 1e12) for part, f in flops_by_part.items())
    return round(ideal_s / step_s, 4)


def device_peaks(device: torch.device) -> dict[str, float] | None:
    """This device's dense peaks; None on a CPU (no meaningful peak for a shared CPU) or a GPU
    missing from PEAK_TFLOPS."""
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _describe(cfg: Config, args, device: torch.device, layout: BatchLayout) -> dict:
    return {
        "files": list(args.config),
        "overrides": list(getattr(args, "overrides", [])),
        "batch_size": cfg.train.batch_size,
        "micro_batch": layout.micro_batch,
        "precision": cfg.ds.precision,
        "zero_stage": cfg.ds.zero_stage,
        "routing_iters": cfg.model.routing_iters,
        "compile": cfg.model.compile,
        "channels_last": cfg.model.channels_last,
        "optimizer": "torch.optim.Adam(fused) in a DeepSpeed engine, as in training",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
