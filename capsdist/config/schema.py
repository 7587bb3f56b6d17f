"""The typed configuration schema: every knob of capsdist, with its default and meaning.

Precedence when loading: these defaults < YAML presets (in order) < `a.b=c` overrides.
Cross-field rules raise in `__post_init__`; derived values are methods, not extra fields.
Each field's docstring is the string literal right below it (listed by `capsdist keys`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from capsdist.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid; the message names the key."""


RESUME_MODES = ("auto", "weights_only", "never")
LR_SCHEDULES = ("reference", "onecycle", "cosine")


def _at_least(section: object, prefix: str, low: int, *keys: str) -> None:
    """Each of `keys` of `section` must be >= low."""
    _check_bound(section, prefix, keys, f">= {low}", lambda value: value >= low)


def _above(section: object, prefix: str, low: int, *keys: str) -> None:
    """Each of `keys` of `section` must be > low."""
    _check_bound(section, prefix, keys, f"> {low}", lambda value: value > low)


def _fraction(section: object, prefix: str, *keys: str) -> None:
    """Each of `keys` of `section` must lie in [0, 1]."""
    _check_bound(section, prefix, keys, "in [0, 1]", lambda value: 0 <= value <= 1)


def _one_of(section: object, prefix: str, key: str, choices: tuple[str, ...]) -> None:
    """`key` of `section` must be one of `choices`."""
    value = getattr(section, key)
    if value not in choices:
        raise ConfigError(f"{prefix}.{key} must be one of {', '.join(choices)}, got {value!r}")


def _check_bound(section: object, prefix: str, keys: tuple[str, ...], bound: str, holds) -> None:
    # Finite too: NaN fails every comparison, so a plain `if lr <= 0` lets it through.
    for key in keys:
        value = getattr(section, key)
        if not (holds(value) and math.isfinite(value)):
            number = "a finite number" if isinstance(value, float) else "a whole number"
            raise ConfigError(f"{prefix}.{key} must be {number} {bound}, got {value}")


@dataclass
class DataConfig:
    root: str = ""
    """Folder or URL (file://, http(s)://, s3://, gs://) holding meta.json and the shards written
    by `capsdist data ...` (required to train)."""
    shards: str = ""
    """Override the shard list of the training split: a brace pattern or URL
    (`s3://b/train-{000000..000127}.tar`) or a `pipe:` command; empty = meta.json's shards."""
    cache_dir: str = ""
    """Keep a local copy of every remote shard here, so each node fetches a shard once; empty =
    stream remote shards without keeping them."""
    dataset: str = "mnist"
    """Name of the data set; must match `dataset` in the shards' meta.json."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str = "test"
    """Split used for evaluation and validation."""
    shift_pixels: int = 2
    """Random training translation, ±pixels per axis with zero fill (the reference's MNIST)."""
    shift_until: float = 1.0
    """Shift (data.shift_pixels) only during this first fraction of training, then train on
    unshifted images; the fraction is the LR schedule's progress (step / train.max_steps, or of
    the steps that fit in train.time_limit_s). 1 = the whole run (the reference)."""
    shuffle_buffer: int = 2000
    """Samples held in the in-memory shuffle buffer of each reader (0 or 1: no shuffling)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process)."""
    flip: bool = False
    """Random left-right flips in training (the reference's CIFAR-10)."""
    brightness: float = 0.0
    """Random training brightness delta, ±this on the 0-255 scale (reference CIFAR-10: 63)."""
    contrast: list[float] = field(default_factory=list)
    """Random training contrast factor range [low, high] (reference: [0.2, 1.8]); [] = off."""
    standardize: bool = False
    """Per-image standardisation (mean 0, std 1), in training and evaluation (CIFAR-10, NORB).
    (Images larger than model.image_shape are cropped to it: at random in training, centred at
    evaluation: CIFAR-10 32x32 → 24x24, smallNORB 48x48 → 32x32.)"""
    on_error: str = "raise"
    """A bad sample or damaged shard: `raise` (error naming shard + sample key) or `skip` (leave
    it out, count it as `data_skipped` in the metrics)."""
    extra_eval_roots: list[str] = field(default_factory=list)
    """More data sets (shard folders) that `capsdist eval` also evaluates on, each reported
    under its folder name (affNIST: the expanded-MNIST test split + affNIST)."""

    def __post_init__(self) -> None:
        _at_least(self, "data", 0, "shift_pixels", "shuffle_buffer", "num_workers", "brightness")
        _fraction(self, "data", "shift_until")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error must be raise or skip, got {self.on_error!r}")
        low_high = (
            len(self.contrast) == 2
            and all(map(math.isfinite, self.contrast))
            and 0 <= self.contrast[0] <= self.contrast[1]
        )
        if self.contrast and not low_high:
            raise ConfigError(f"data.contrast must be [] or [low, high], got {self.contrast}")


@dataclass
class ModelConfig:
    name: str = "capsnet"
    """Architecture: `capsnet`, `baseline` (the reference code's CNN) or `baseline_paper`."""
    image_shape: list[int] = field(default_factory=lambda: [28, 28, 1])
    """Input image shape [H, W, C] as the model sees it (after any crop)."""
    num_classes: int = 10
    """Number of classes (class capsules)."""
    num_targets: int = 1
    """Objects per image: 1, or 2 for MultiMNIST (both labels must be the top two)."""
    conv1_channels: int = 256
    """Channels of the first 9x9 convolution."""
    conv1_kernel: int = 9
    """Kernel size of the first convolution."""
    primary_kernel: int = 9
    """Kernel size of the primary-capsule convolution (stride 2)."""
    num_prime_capsules: int = 32
    """Primary capsule types (the reference's `num_prime_capsules`)."""
    prime_dim: int = 8
    """Pose dimensions of a primary capsule."""
    class_dim: int = 16
    """Pose dimensions of a class capsule."""
    routing_iters: int = 3
    """Routing-by-agreement iterations in the class-capsule layer (the reference's `routing`)."""
    train_routing_iters: int = 0
    """Routing iterations while training; 0 = the same as model.routing_iters. Fewer are cheaper
    per step; the weights are the same shape."""
    eval_routing_iters: int = 0
    """Routing iterations in evaluation mode (eval, validation, in-loop evaluations, predict,
    export, ensembles); 0 = the same as model.routing_iters. The weights are the same, so any
    checkpoint can be evaluated with another count."""
    primary_scaling: str = "reference"
    """Primary capsules: `reference` scales the conv output by 1/num_prime_capsules before the
    bias and squash (the reference code's one-iteration routing quirk); `paper` squashes the
    conv output + bias as it is (the paper's "squash of a convolution")."""
    padding: str = "VALID"
    """Padding of conv1 and the primary-capsule conv: `VALID` or `SAME` (TensorFlow semantics)."""
    leaky_routing: bool = False
    """Add an all-zero "orphan" logit to the routing softmax (the reference's `leaky`)."""
    routing_detach: bool = False
    """Stop gradients through the votes in all but the last routing iteration (reference: off)."""
    reconstruction: bool = True
    """Reconstruction decoder and its loss (the reference's `remake`)."""
    decoder_hidden: list[int] = field(default_factory=lambda: [512, 1024])
    """Hidden widths of the reconstruction decoder."""
    compile: bool = False
    """Run the CapsNet forward through torch.compile; falls back to eager (with a warning)
    where compiling fails. Weights and checkpoints are unchanged."""
    channels_last: bool = False
    """Feed the convolutions channels_last tensors (helps on GPUs; measured no gain on CPU)."""
    fused_routing: bool = True
    """On CPU, route with the fused C++ passes of models/routing_cpu.cpp (built with the
    system's C++ compiler on first use, cached; torch ops where that fails). Same results."""

    def __post_init__(self) -> None:
        if self.name not in ("capsnet", "baseline", "baseline_paper"):
            raise ConfigError(
                f"model.name must be capsnet, baseline or baseline_paper, got {self.name!r}"
            )
        if self.padding not in ("VALID", "SAME"):
            raise ConfigError(f"model.padding must be VALID or SAME, got {self.padding!r}")
        if self.primary_scaling not in ("reference", "paper"):
            raise ConfigError(
                f"model.primary_scaling must be reference or paper, got {self.primary_scaling!r}"
            )
        _at_least(self, "model", 0, "train_routing_iters", "eval_routing_iters")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ConfigError(f"model.image_shape must be [H, W, C], got {self.image_shape}")
        _at_least(self, "model", 2, "num_classes")  # fewer is no classification
        sizes = ("conv1_channels", "conv1_kernel", "primary_kernel", "num_prime_capsules")
        _at_least(self, "model", 1, *sizes, "prime_dim", "class_dim", "routing_iters")
        if min(self.decoder_hidden, default=1) < 1:
            raise ConfigError(
                f"model.decoder_hidden widths must be >= 1, got {self.decoder_hidden}"
            )
        if self.num_targets not in (1, 2):
            raise ConfigError(f"model.num_targets must be 1 or 2, got {self.num_targets}")

    def routing_iters_in(self, training: bool) -> int:
        """Routing iterations in training or in evaluation mode: model.train_routing_iters or
        model.eval_routing_iters, where set (0 = model.routing_iters)."""
        iters = self.train_routing_iters if training else self.eval_routing_iters
        return iters or self.routing_iters


@dataclass
class LossConfig:
    name: str = "margin"
    """`margin` (CapsNet), `softmax` (1-target CNN) or `sigmoid` (2-target CNN), as reference."""
    margin_reduction: str = "reference"
    """`reference`: mean over batch and classes with the code's extra 0.5 (= 0.5/J x paper);
    `paper`: sum over classes, mean over batch."""
    m_plus: float = 0.9
    """Margin loss: a present class should have length above this."""
    m_minus: float = 0.1
    """Margin loss: an absent class should have length below this."""
    down_weight: float = 0.5
    """Margin loss: weight of the absent-class term (the paper's lambda)."""
    reconstruction_weight: float = 0.0005
    """Weight of the reconstruction loss (sum of squared pixel errors, batch mean)."""

    def __post_init__(self) -> None:
        if self.name not in ("margin", "softmax", "sigmoid"):
            raise ConfigError(f"loss.name must be margin, softmax or sigmoid, got {self.name!r}")
        if self.margin_reduction not in ("reference", "paper"):
            raise ConfigError(
                f"loss.margin_reduction must be reference or paper, got {self.margin_reduction!r}"
            )
        _above(self, "loss", 0, "m_plus")
        _at_least(self, "loss", 0, "m_minus", "down_weight", "reconstruction_weight")


@dataclass
class TrainConfig:
    batch_size: int = 128
    """Global batch size (summed over all ranks and accumulation steps), the reference's 128."""
    micro_batch_size: int = 0
    """Per-rank micro-batch; 0 means batch_size / world_size (no gradient accumulation)."""
    max_steps: int = 1000
    """Optimizer steps to train for (the reference's `max_steps`)."""
    time_limit_s: float = 0.0
    """Stop cleanly after this many seconds of training (checkpoint + export); 0 = no limit.
    Checked at log and checkpoint steps only, on the main rank's clock, so the run stops within
    `log_every` steps of it. Counted per job; in-loop evaluations (train.eval_every,
    train.eval_every_s) are not training time. With train.lr_schedule=onecycle|cosine it also
    sets where the schedule ends."""
    lr: float = 0.001
    """Adam learning rate (the reference's `learning_rate`); the peak of the onecycle and cosine
    schedules (train.lr_schedule)."""
    adam_beta1: float = 0.9
    """Adam's decay of its gradient average (TensorFlow's and torch's default, the reference's)."""
    adam_beta2: float = 0.999
    """Adam's decay of its squared-gradient average: 0.999 (the reference's) averages over
    ~1,000 steps; a run of a few thousand steps may prefer a shorter memory."""
    lr_decay_rate: float = 0.96
    """Exponential decay: lr * rate^(step / lr_decay_steps), continuous (the reference's)."""
    lr_decay_steps: int = 2000
    """Steps over which the learning rate decays by `lr_decay_rate`."""
    lr_min: float = 1e-6
    """Floor of the decayed learning rate."""
    lr_schedule: str = "reference"
    """`reference`: the exponential decay above (train.lr_decay_*). `onecycle`: warm up linearly
    to train.lr, then down linearly to train.lr x lr_final_factor at the end. `cosine`: the same
    warm-up, then a half cosine down to the same end. The end is train.max_steps, or with
    train.time_limit_s > 0 the steps estimated to fit in it (re-estimated at log steps)."""
    warmup_frac: float = 0.1
    """onecycle / cosine: the fraction of training spent warming up, from train.lr x
    lr_start_factor to train.lr (in [0, 1))."""
    lr_start_factor: float = 0.04
    """onecycle / cosine: the warm-up starts at train.lr x this (0.04 = 1/25, as torch's
    OneCycleLR)."""
    lr_final_factor: float = 0.01
    """onecycle / cosine: the learning rate ends at train.lr x this."""
    checkpoint_every: int = 1500
    """Checkpoint every this many steps (the reference's `save_step`); 0 = only at the end."""
    keep_last: int = 3
    """Number of checkpoints kept in run.dir/checkpoints."""
    log_every: int = 10
    """Write a metrics.jsonl / W&B line every this many steps. The loop reads the device only at
    log (and checkpoint) steps: the NaN check, time limit and stop signals are decided there."""
    eval_every: int = 0
    """Evaluate on data.eval_split every this many steps (a multiple of log_every) and at the
    end, on the main rank; 0 = off (use `capsdist validate` beside the run instead)."""
    eval_every_s: float = 0.0
    """Evaluate (as train.eval_every, on train.eval_examples) at the first log step after
    every this many seconds of training, and at the end; each such line also logs
    `train_time_s`. Training seconds exclude the in-loop evaluations (logged apart as
    `eval_time_s`), for train.time_limit_s too. 0 = off."""
    eval_examples: int = 0
    """The in-loop evaluations (train.eval_every, train.eval_every_s) read the first this many
    examples of data.eval_split; 0 = eval.max_examples. `capsdist eval` always reads
    eval.max_examples, so a quick in-loop check does not shrink the final evaluation."""
    resume: str = "auto"
    """When run.dir holds checkpoints: `auto` continues from the newest one (weights, Adam
    state, step, data position; also after a change of world size, ds.zero_stage or
    ds.precision), `weights_only` continues at its step with its weights and a fresh Adam
    state, `never` refuses to touch the run (an empty run.dir starts fresh)."""
    init_from: str = ""
    """Warm start: a `model.safetensors` (or a run directory: its exported weights) whose
    weights a new run starts from, with a fresh optimizer at step 0; ignored when run.dir
    already holds a checkpoint of its own to resume from."""
    init_strict: bool = True
    """With train.init_from: every weight must match the model (name and shape); false loads
    the ones that do and lists the rest (e.g. the class capsules after a change of
    model.num_classes), which keep their fresh initialisation."""

    def __post_init__(self) -> None:
        _one_of(self, "train", "resume", RESUME_MODES)
        counts = ("batch_size", "max_steps", "lr_decay_steps", "log_every", "keep_last")
        _at_least(self, "train", 1, *counts)
        zero_allowed = ("micro_batch_size", "time_limit_s", "checkpoint_every")
        _at_least(self, "train", 0, *zero_allowed, "lr_min")
        _above(self, "train", 0, "lr", "lr_decay_rate")
        _at_least(self, "train", 0, "eval_every_s")
        _at_least(self, "train", 0, "eval_examples")
        _one_of(self, "train", "lr_schedule", LR_SCHEDULES)
        _fraction(self, "train", "lr_start_factor", "lr_final_factor")
        for key in ("warmup_frac", "adam_beta1", "adam_beta2"):
            if not (0 <= getattr(self, key) < 1):
                raise ConfigError(f"train.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.eval_every < 0 or (self.eval_every and self.eval_every % self.log_every):
            raise ConfigError(
                f"train.eval_every={self.eval_every} must be 0 or a multiple of "
                f"train.log_every={self.log_every}"
            )


@dataclass
class EvalConfig:
    batch_size: int = 100
    """Evaluation batch size per rank (the reference's 100)."""
    max_examples: int = 0
    """Evaluate on at most this many examples; 0 = the whole split."""

    def __post_init__(self) -> None:
        _at_least(self, "eval", 1, "batch_size")
        _at_least(self, "eval", 0, "max_examples")


@dataclass
class ValidateConfig:
    poll_s: float = 60.0
    """`capsdist validate`: seconds between looks for a new checkpoint (the reference's 60)."""
    timeout_s: float = 6 * 3600.0
    """`capsdist validate` gives up after this long without a new checkpoint (reference: 6 h)."""

    def __post_init__(self) -> None:
        _above(self, "validate", 0, "poll_s", "timeout_s")


@dataclass
class RunConfig:
    dir: str = ""
    """Run directory (config, checkpoints, metrics, weights); empty = runs/<first config's name>."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO optimisation stage: 0, 1 or 2."""
    precision: str = "fp32"
    """`fp32`, `bf16` or `fp16` (fp16 needs a GPU; routing overflows in fp16, bf16 works)."""
    gradient_clipping: float = 0.0
    """Clip the global gradient norm to this value; 0 = off (the reference does not clip)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More DeepSpeed config, merged into the one capsdist writes (run.dir/deepspeed_config.json)
    and checked against DeepSpeed's own config classes before training, e.g.
    `ds.extra.zero_optimization.overlap_comm=true`. What has a key of its own (batch sizes,
    ds.precision, ds.zero_stage, ds.gradient_clipping, the optimizer) is refused here."""

    def __post_init__(self) -> None:
        if not isinstance(self.extra, dict):
            raise ConfigError(f"ds.extra must be a mapping of DeepSpeed keys, got {self.extra!r}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"ds.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"ds.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        _at_least(self, "ds", 0, "gradient_clipping")


@dataclass
class WandbConfig:
    mode: str = "offline"
    """`offline` (default: nothing needs the network), `online` or `disabled`."""
    project: str = "capsdist"
    """W&B project."""
    group: str = ""
    """W&B group (sweeps and ensembles set it)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"wandb.mode must be offline, online or disabled, got {self.mode!r}")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayConfig:
    """How `LAUNCHER=ray` (launch/ray_train.py) runs the training loop in Ray Train workers; the
    number of workers comes from the launcher (NNODES x NPROC)."""

    gpus_per_worker: float = -1.0
    """GPUs each Ray Train worker asks for: -1 = 1 when the Ray cluster has GPUs (its total, as
    `ray.cluster_resources()` reports it, not the driver's), else 0; or 0 < x <= 1 (a fraction
    shares a GPU between workers). One worker never drives more than one GPU."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray Train worker asks for (fractional allowed)."""
    max_failures: int = 3
    """Ray Train restarts the whole worker group up to this many times after a worker dies or
    fails (FailureConfig); the run resumes from its last reported checkpoint. 0 = never."""
    storage_path: str = ""
    """Where Ray Train keeps its state and the reported checkpoints (a copy of every complete
    run.dir checkpoint), under `<storage_path>/<run.dir's name>`: a folder every node sees, or a
    URL such as `s3://bucket/prefix` (endpoint and credentials from the usual AWS_* variables,
    AWS_ENDPOINT_URL included). Empty = run.dir/ray (one node, or run.dir on shared storage).
    `capsdist sweep` keeps Tune's state under `<storage_path>/<sweep name>` by the same rule."""
    placement_strategy: str = "PACK"
    """How Ray places the workers on nodes: PACK (fill few nodes), SPREAD (over as many as
    possible), STRICT_SPREAD (one per node, or wait), STRICT_PACK (all on one node)."""

    def __post_init__(self) -> None:
        gpus = self.gpus_per_worker
        if not (gpus == -1 or (math.isfinite(gpus) and 0 <= gpus <= 1)):
            raise ConfigError(
                f"ray.gpus_per_worker must be -1 (auto) or between 0 and 1, got {gpus}: "
                "a worker trains on one GPU (start more workers for more GPUs)"
            )
        _above(self, "ray", 0, "cpus_per_worker")
        _at_least(self, "ray", 0, "max_failures")
        _one_of(self, "ray", "placement_strategy", PLACEMENT_STRATEGIES)
        scheme, sep, rest = self.storage_path.partition("://")
        if sep and (not scheme or not rest.strip("/")):
            raise ConfigError(
                f"ray.storage_path={self.storage_path!r} names no location: use e.g. "
                "s3://bucket/prefix or a folder every node sees"
            )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0
    """Seed of weights, data order and augmentation."""
    ckpt: str = ""
    """Checkpoint to evaluate: a run directory or a .safetensors file (`capsdist eval`)."""

    def __post_init__(self) -> None:
        is_cnn = self.model.name != "capsnet"
        if is_cnn and self.loss.name == "margin":
            raise ConfigError(
                f"loss.name=margin needs capsule lengths; model.name={self.model.name} "
                "trains with loss.name=softmax (1 target) or sigmoid (2 targets)"
            )
        if self.loss.name == "softmax" and self.model.num_targets != 1:
            raise ConfigError("loss.name=softmax is for model.num_targets=1; use sigmoid")
