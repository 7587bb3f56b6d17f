"""Saving and resuming DeepSpeed checkpoints in run.dir/checkpoints (layout: capsdist/run_dir.py);
a crash never loses the last good one.

Nothing here unpickles arbitrary objects. Resume reads DeepSpeed's files with torch's weights-only
unpickler and an allow-list of the few DeepSpeed classes its checkpoints hold; an intact file that
holds anything else is refused as tampered, never skipped as damaged. The exported fp32 weights are
gathered in memory, not read back from the files just written.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from capsdist.config import Config, config_to_yaml
from capsdist.distributed import DistEnv
from capsdist.run_dir import (
    WEIGHTS,
    CheckpointError,
    complete_checkpoints,
    export_weights,
    mark_complete,
    tag_for,
)

# torch's weights-only unpickler names the global it refused, as in "GLOBAL builtins.open was
# not an allowed global" or "GLOBAL posix.system whose module posix is blocked".
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def save_checkpoint(engine, ckpt_dir: Path, step: int, cfg: Config, env: DistEnv) -> Path:
    """Save on every rank (ZeRO shards) and gather the fp32 weights (a collective); then the
    main rank exports them, marks the checkpoint complete, points `latest` at it and prunes old
    ones. Returns the checkpoint folder."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    state = consolidated_fp32_state(engine, cfg)
    dist.barrier()
    if env.is_main:
        export_weights(state, config_to_yaml(cfg), folder / WEIGHTS)
        mark_complete(folder, step, cfg, cfg.train.keep_last)
    dist.barrier()
    return folder


def consolidated_fp32_state(engine, cfg: Config) -> dict:
    """The full model in fp32; call it on every rank. With ZeRO 1/2 (or bf16/fp16) the fp32
    master weights live sharded in the optimizers of every rank: DeepSpeed's
    safe_get_full_fp32_param all-reduces each one from its shards. Without either, the module's
    own fp32 parameters are the master weights.

    Gathered in memory rather than by DeepSpeed's zero_to_fp32 from the files just written: that
    script torch.loads them with a hard-coded weights_only=False, so whoever can write run.dir
    could swap a file in the second between this job writing and reading it and run code here."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        master = safe_get_full_fp32_param(param)
        if master is not None:
            state[name] = master.detach().float().cpu()
        elif cfg.ds.precision != "fp32":
            # ZeRO-0 with bf16/fp16 keeps its masters flat in FP16_Optimizer, with no
            # per-parameter view; exporting the low-precision weights instead would lose work.
            raise RuntimeError(
                f"no fp32 master weight for {name} with ds.precision={cfg.ds.precision} and "
                f"ds.zero_stage={cfg.ds.zero_stage}: use ds.zero_stage=1 or 2"
            )
    return state


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


def load_latest(engine, ckpt_dir: Path) -> tuple[int, dict] | None:
    """Resume from the newest complete checkpoint; if it cannot be loaded, warn and fall back
    to the one before. A tampered file is never skipped: it raises CheckpointError. Returns
    (step, client_state), or None when there is nothing to resume."""
    checkpoints = complete_checkpoints(ckpt_dir)
    for step, folder in reversed(checkpoints):
        try:
            with _weights_only_loads(engine):
                path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=folder.name)
        except CheckpointError:
            raise  # tampered: falling back would hide it
        except Exception as err:  # a damaged file surfaces as any of torch's load errors
            warnings.warn(
                f"checkpoint {folder} is damaged ({err}); trying the previous one", stacklevel=2
            )
            continue
        if path is None:
            warnings.warn(
                f"checkpoint {folder} could not be loaded; trying the previous one", stacklevel=2
            )
            continue
        return step, client_state
    if checkpoints:
        raise CheckpointError(f"no loadable checkpoint in {ckpt_dir}: all are damaged")
    return None
