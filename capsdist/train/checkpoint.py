"""Saving and resuming checkpoints in run.dir/checkpoints (layout: capsdist/run_dir.py); a crash
never loses the last good one.

A checkpoint holds DeepSpeed's own files and, gathered in memory on every save, the model's fp32
weights (model.safetensors) and Adam's moments and step (optimizer.safetensors), both whole, as if
on one rank. A run resumes from DeepSpeed's files when the job has the topology (world size,
ZeRO stage, precision) that wrote them; otherwise from the safetensors, resharded into whatever
the new engine is (capsdist/distributed/masters.py): a change of cluster shape is normal, never
"damage".

Nothing here unpickles arbitrary objects. DeepSpeed's files are read with torch's weights-only
unpickler and an allow-list of the few DeepSpeed classes its checkpoints hold; an intact file that
holds anything else is refused as tampered, never skipped as damaged.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from capsdist.config import Config, config_to_yaml
from capsdist.distributed import DistEnv
from capsdist.distributed.masters import (
    MOMENTS,
    adam_state,
    full_fp32_state,
    set_adam_state,
    set_fp32_weights,
    trained_parameters,
)
from capsdist.run_dir import (
    OPTIMIZER,
    WEIGHTS,
    CheckpointError,
    UnreadableWeightsError,
    complete_checkpoints,
    export_adam_state,
    export_weights,
    load_adam_state,
    load_weights,
    mark_complete,
    read_marker,
    tag_for,
)
from capsdist.train.data_position import DataPosition

# torch's weights-only unpickler names the global it refused, as in "GLOBAL builtins.open was
# not an allowed global" or "GLOBAL posix.system whose module posix is blocked".
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


@dataclass(frozen=True)
class Topology:
    """How the engine that wrote a checkpoint held its state: DeepSpeed's files only load into
    the same."""

    world_size: int
    zero_stage: int
    precision: str

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> Topology:
        return cls(world_size, cfg.ds.zero_stage, cfg.ds.precision)

    def changes_to(self, now: Topology) -> list[str]:
        """What differs, as "world 2→1", "ZeRO 1→2", "bf16→fp32"."""
        pairs = (
            ("world ", self.world_size, now.world_size),
            ("ZeRO ", self.zero_stage, now.zero_stage),
            ("", self.precision, now.precision),
        )
        return [f"{name}{was}→{is_}" for name, was, is_ in pairs if was != is_]


@dataclass(frozen=True)
class Resumed:
    """What a job continues from."""

    step: int
    folder: Path
    data: DataPosition | None
    """The data position saved with the checkpoint (None: written by an older capsdist)."""
    message: str
    """The log line: the step, and what changed since (world size, ZeRO stage, precision)."""
    pacing: dict = field(default_factory=dict)
    """The training clock and schedule horizon saved with it (train/pacing.py; {} if none)."""


def save_checkpoint(
    engine,
    ckpt_dir: Path,
    step: int,
    cfg: Config,
    env: DistEnv,
    data: DataPosition,
    pacing: dict | None = None,
) -> Path:
    """Save on every rank (ZeRO shards) and gather the fp32 weights and Adam's state (both
    collectives); then the main rank exports them, marks the checkpoint complete (with this
    job's topology, `data`, its data position, and `pacing`, the training clock and schedule
    horizon), points `latest` at it and prunes old ones. Returns the checkpoint folder."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    weights = consolidated_fp32_state(engine)
    moments, adam_step = adam_state(engine)
    dist.barrier()
    if env.is_main:
        export_weights(weights, config_to_yaml(cfg), folder / WEIGHTS)
        export_adam_state(moments, adam_step, folder / OPTIMIZER)
        topology = asdict(Topology.of(cfg, env.world_size))
        record = {"topology": topology, "data": data.to_json(), "pacing": pacing or {}}
        mark_complete(folder, step, cfg, cfg.train.keep_last, resume=record)
    dist.barrier()
    return folder


def consolidated_fp32_state(engine) -> dict:
    """The full model in fp32 (parameters from the fp32 master weights, wherever this engine
    keeps them: capsdist/distributed/masters.py); call it on every rank.

    Gathered in memory rather than by DeepSpeed's zero_to_fp32 from the files just written: that
    script torch.loads them with a hard-coded weights_only=False, so whoever can write run.dir
    could swap a file in the second between this job writing and reading it and run code here."""
    return full_fp32_state(engine)


def load_deepspeed_file(path: str | Path, map_location=None):
    """torch.load of one of DeepSpeed's checkpoint files with weights_only=True: tensors, plain
    containers and the allow-list below only. A file refused although intact holds objects
    outside the allow-list on purpose: CheckpointError (tampered). A damaged file raises torch's
    own error, to be treated as damaged."""
    with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if not _is_intact(Path(path)):
                raise
            refused = _REFUSED_GLOBAL.search(str(err))
            raise CheckpointError(
                f"refusing tampered checkpoint file {path}: it holds objects outside the "
                "allow-list of what DeepSpeed's checkpoints hold"
                f"{f' ({refused.group(1)})' if refused else ''} and was not loaded; move its "
                "folder away to resume from the previous checkpoint"
            ) from None


def _is_intact(path: Path) -> bool:
    """Whether a file the unpickler refused is whole as written, so that what it holds was put
    there on purpose: a zip (torch.save's format) whose records all match their CRC-32 (torch's
    reader checks none: a flipped bit can turn "torch.FloatStorage" into a name it refuses), or
    a bare pickle that parses to its end."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
        except (zipfile.BadZipFile, EOFError):  # a damaged directory, header or record
            return False
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):  # reads the opcodes only; runs nothing
                pass
    except ValueError:
        return False
    return True


def _deepspeed_checkpoint_globals() -> list[type]:
    """The classes DeepSpeed 0.19 pickles into its checkpoints besides tensors and containers,
    found by loading real ZeRO 0/1/2 x fp32/bf16 checkpoints with weights_only=True (and
    DynamicLossScaler, fp16's, from DeepSpeed's source: fp16 needs a GPU). Each is rebuilt from
    plain values with no __setstate__ or __reduce__ of its own, so allowing them runs no code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with its `load` (a torch.load with weights_only=False)
    replaced by load_deepspeed_file; everything else is passed on to the engine it wraps."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return load_deepspeed_file(path, map_location)


@contextmanager
def _weights_only_loads(engine) -> Iterator[None]:
    """Every file engine.load_checkpoint reads (model states, ZeRO optimizer shards) goes
    through engine.checkpoint_engine.load: swap that engine for the load only, rather than
    patching torch.load for the whole process."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


def resume_latest(engine, ckpt_dir: Path, cfg: Config, env: DistEnv) -> Resumed | None:
    """Continue from the newest complete checkpoint, as train.resume says (`auto`: everything;
    `weights_only`: its weights, with the fresh Adam state of `engine`); if it cannot be
    loaded, warn and fall back to the one before. A tampered file is never skipped: it raises
    CheckpointError. Returns None when there is nothing to resume. Call it on every rank."""
    checkpoints = complete_checkpoints(ckpt_dir)
    now = Topology.of(cfg, env.world_size)
    for step, folder in reversed(checkpoints):
        record = read_marker(folder).get("resume", {})
        saved = Topology(**record["topology"]) if "topology" in record else None
        how = _how_to_load(cfg.train.resume, saved, now)
        problem = None
        try:
            how(engine, ckpt_dir, folder)
        except UnreadableWeightsError as err:
            problem = err
        except CheckpointError:
            raise  # tampered: falling back would hide it
        except Exception as err:  # a damaged file surfaces as any of torch's load errors
            problem = err
            if saved is None and isinstance(err, FileNotFoundError):
                raise _older_checkpoint(folder, err) from err
        if _on_any_rank(problem is not None):  # every rank falls back, or none does
            warnings.warn(
                f"checkpoint {folder} is damaged ({problem or 'on another rank'}); trying the "
                "previous one",
                stacklevel=2,
            )
            continue
        if how is not _load_deepspeed_files:
            _continue_schedule(engine, step, cfg.train.batch_size)
        data = DataPosition.from_json(record["data"]) if "data" in record else None
        message = _resume_message(ckpt_dir, step, saved, now, cfg.train.resume)
        return Resumed(step, folder, data, message, record.get("pacing", {}))
    if checkpoints:
        raise CheckpointError(f"no loadable checkpoint in {ckpt_dir}: all are damaged")
    return None


def _how_to_load(mode: str, saved: Topology | None, now: Topology):
    if mode == "weights_only":
        return _load_weights_only
    if saved is None or saved == now:  # older checkpoints have no record: try as they are
        return _load_deepspeed_files
    return _load_resharded


def _resume_message(
    ckpt_dir: Path, step: int, saved: Topology | None, now: Topology, mode: str
) -> str:
    """E.g. "resumed from runs/x/checkpoints at step 20: world 2→1, ZeRO 1→2"."""
    changes = saved.changes_to(now) if saved else []
    what = ", ".join(changes) if changes else "same world size, ZeRO stage and precision"
    if mode == "weights_only":
        what += "; its weights only, a fresh Adam state (train.resume=weights_only)"
    return f"resumed from {ckpt_dir} at step {step}: {what}"


def _older_checkpoint(folder: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {folder} has no topology-free optimizer state (written by an older "
        f"capsdist) and DeepSpeed's files do not fit this job ({err}): resume it with the "
        "world size, ds.zero_stage and ds.precision it was written with, or with "
        "train.resume=weights_only (its weights, a fresh Adam state)"
    )


def _load_deepspeed_files(engine, ckpt_dir: Path, folder: Path) -> None:
    """DeepSpeed's own files, written by the same topology: everything, exactly."""
    with _weights_only_loads(engine):
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=folder.name)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")


def _load_resharded(engine, ckpt_dir: Path, folder: Path) -> None:
    """The consolidated fp32 weights and Adam state, written into this engine's layout."""
    weights, _ = load_weights(folder / WEIGHTS)
    moments, adam_step = load_adam_state(folder / OPTIMIZER)
    _check_complete(engine, weights, moments, adam_step, folder)
    set_fp32_weights(engine, weights)
    set_adam_state(engine, moments, adam_step)


def _load_weights_only(engine, ckpt_dir: Path, folder: Path) -> None:
    weights, _ = load_weights(folder / WEIGHTS)
    _check_complete(engine, weights, None, 0, folder)
    set_fp32_weights(engine, weights)


def _check_complete(
    engine, weights: dict, moments: dict | None, adam_step: int, folder: Path
) -> None:
    """Every tensor the engine needs is there, with its shape (else the files are damaged)."""
    want = {k: tuple(v.shape) for k, v in engine.module.state_dict().items()}
    if moments is not None and adam_step > 0:
        for name, param in trained_parameters(engine):
            want.update({f"{key}.{name}": tuple(param.shape) for key in MOMENTS})
    have = {k: tuple(v.shape) for k, v in {**weights, **(moments or {})}.items()}
    wrong = [k for k, shape in want.items() if have.get(k) != shape]
    if wrong:
        raise UnreadableWeightsError(
            f"{folder} lacks or has misshapen tensors for this model: {', '.join(wrong[:5])}"
        )


def _continue_schedule(engine, step: int, global_batch: int) -> None:
    """After loading anything but DeepSpeed's files (which restore them): the engine's step
    counters and the learning rate schedule, at `step`."""
    engine.global_steps, engine.global_samples = step, step * global_batch
    scheduler = engine.lr_scheduler
    lrs = [
        base * decay(step)
        for base, decay in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler.last_epoch, scheduler._last_lr = step, lrs


def _on_any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (a collective; the flag itself without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_reduce_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _reduce_device() -> torch.device:
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
