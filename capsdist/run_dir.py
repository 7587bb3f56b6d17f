"""The run directory: its format, written by training and read by eval, validate, ensembles and
figures. The one module that knows the file names, the checkpoint marker, the lock and the
"same model?" and "same run?" rules.

    run.dir/
      .lock                  held (flock) by the training job writing here; its host and pid
      config.yaml            resolved config of the run
      status.json            running | finished | stopped | failed, with the step (write_status)
      model.safetensors      exported fp32 weights + config YAML in the metadata (eval reads this)
      train.json, eval.json  the results of `capsdist train` / `capsdist eval`
      checkpoints/stepNNNNNNNNN/   DeepSpeed's files, model.safetensors (consolidated fp32),
                                   optimizer.safetensors (Adam's moments, consolidated fp32: a
                                   run resumes from it on another world size, ZeRO stage or
                                   precision) and capsdist.json (step, model, what wrote it,
                                   the data position), written LAST: the checkpoint is complete
      checkpoints/latest     the newest complete tag, replaced atomically

Every file is written atomically (temp file + rename): a crash mid-write leaves the old file,
never half a new one. Weights are read from safetensors only (no pickle).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from capsdist.config import Config, ModelConfig, config_to_yaml
from capsdist.errors import UserError

CONFIG = "config.yaml"
STATUS = "status.json"
METRICS = "metrics.jsonl"  # one JSON object a line: training's log lines and validate's
LOCK = ".lock"
WEIGHTS = "model.safetensors"  # in run.dir (final) and in every checkpoint folder
OPTIMIZER = "optimizer.safetensors"  # in every checkpoint folder: Adam's state, topology-free
ADAM_STEP_KEY = "adam_step"  # its metadata key holding Adam's step count
CHECKPOINTS = "checkpoints"
MARKER = "capsdist.json"  # in a checkpoint folder: written last, marks it complete
LATEST = "latest"
CONFIG_KEY = "capsdist_config"  # safetensors metadata key holding the config YAML

# How the model runs, not what it is: weights move freely between these settings.
RUNTIME_MODEL_KEYS = ("compile", "channels_last", "fused_routing", "eval_routing_iters")
# How the model trains, not what it is: another value is another run ("same run?"), but the
# weights are the same model's ("same model?": eval, warm start, ensembles).
TRAINING_ONLY_MODEL_KEYS = ("train_routing_iters",)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, damaged or belongs to another model; the message names it."""


class UnreadableWeightsError(CheckpointError):
    """A weights file is missing, truncated or not safetensors."""


class RunDirError(UserError, RuntimeError):
    """run.dir cannot take this job: in use by another, not a writable directory, full, or
    holding a run with other settings; the message names it and what to do."""


# ---- atomic writes ------------------------------------------------------------------------------


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep half a temp file
        raise


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_file_atomic(src: Path, dst: Path) -> None:
    tmp = _tmp_beside(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_config(run_dir: Path, cfg: Config) -> None:
    """run.dir/config.yaml: the resolved config."""
    write_text_atomic(run_dir / CONFIG, config_to_yaml(cfg))


# ---- exported weights (safetensors) -------------------------------------------------------------


def export_weights(state: dict[str, torch.Tensor], config_yaml: str, path: Path) -> None:
    """Write a state dict as fp32 safetensors with the resolved config in the metadata."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    tmp = _tmp_beside(path)
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: config_yaml})
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, config YAML) of exported weights; no pickle involved."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata.get(CONFIG_KEY, "")
    except (SafetensorError, OSError) as err:
        raise UnreadableWeightsError(f"{path} is not a readable safetensors file ({err})") from err


def export_adam_state(moments: dict[str, torch.Tensor], adam_step: int, path: Path) -> None:
    """Write Adam's moments (`exp_avg.NAME`, `exp_avg_sq.NAME`, full fp32 tensors) and its step
    count as safetensors."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in moments.items()}
    tmp = _tmp_beside(path)
    save_file(tensors, str(tmp), metadata={ADAM_STEP_KEY: str(adam_step)})
    os.replace(tmp, path)


def load_adam_state(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(moments, Adam's step count) written by export_adam_state; no pickle involved."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), int(metadata[ADAM_STEP_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise UnreadableWeightsError(f"{path} is not a readable Adam state ({err})") from err


def saved_model_config(config_yaml: str) -> dict:
    """The `model` section of a config YAML stored with weights ({} if none was stored)."""
    return (yaml.safe_load(config_yaml or "{}") or {}).get("model", {})


def resolve_weights(ckpt: str) -> Path:
    """`ckpt` is a run directory (its model.safetensors) or a .safetensors file."""
    if not ckpt:
        raise CheckpointError("ckpt is not set: pass ckpt=RUN_DIR or ckpt=FILE.safetensors")
    path = Path(ckpt)
    if path.is_dir():
        weights = path / WEIGHTS
        if not weights.exists():
            hint = (
                " (training has not finished or was stopped early)"
                if (path / CHECKPOINTS).exists()
                else ""
            )
            raise CheckpointError(f"{weights} does not exist{hint}: train to the end first")
        return weights
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


# ---- "same model?" ------------------------------------------------------------------------------


def model_differences(saved: dict, current: ModelConfig | dict) -> list[str]:
    """The architecture settings in which a saved `model` config (a dict) and `current` differ,
    runtime switches (RUNTIME_MODEL_KEYS) and training-only ones (TRAINING_ONLY_MODEL_KEYS)
    aside. A key the saved config lacks (written by an older capsdist) counts as that key's
    default."""
    defaults = asdict(ModelConfig())
    now = current if isinstance(current, dict) else asdict(current)
    return [
        f"model.{k}: {saved.get(k, defaults[k])!r} there, {now.get(k, defaults[k])!r} here"
        for k in defaults
        if k not in RUNTIME_MODEL_KEYS + TRAINING_ONLY_MODEL_KEYS
        and saved.get(k, defaults[k]) != now.get(k, defaults[k])
    ]


# ---- checkpoints --------------------------------------------------------------------------------


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint whose marker was written, oldest first."""
    found = []
    for marker in ckpt_dir.glob(f"step*/{MARKER}"):
        try:
            found.append((int(json.loads(marker.read_text())["step"]), marker.parent))
        except (ValueError, KeyError, json.JSONDecodeError):
            warnings.warn(f"ignoring checkpoint {marker.parent}: unreadable {MARKER}", stacklevel=2)
    return sorted(found)


def mark_complete(
    folder: Path, step: int, cfg: Config, keep_last: int, resume: dict | None = None
) -> None:
    """After every file of a checkpoint is written: its marker (with `resume`: what a resume
    needs to know of the job that wrote it), then `latest`, then prune all but the newest
    `keep_last` complete checkpoints."""
    marker = {"step": step, "model": asdict(cfg.model), **({"resume": resume} if resume else {})}
    write_json_atomic(folder / MARKER, marker)
    write_text_atomic(folder.parent / LATEST, folder.name)
    for _, old in complete_checkpoints(folder.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_marker(folder: Path) -> dict:
    """The marker (capsdist.json) of a complete checkpoint folder."""
    return json.loads((folder / MARKER).read_text())


def check_same_model(ckpt_dir: Path, model_cfg: ModelConfig) -> None:
    """Refuse to resume (or overwrite) a run directory that holds another model's checkpoints."""
    checkpoints = complete_checkpoints(ckpt_dir)
    if not checkpoints:
        return
    saved = json.loads((checkpoints[-1][1] / MARKER).read_text())["model"]
    diffs = model_differences(saved, model_cfg)
    if diffs:
        raise CheckpointError(
            f"{ckpt_dir} holds a checkpoint of a different model ({'; '.join(diffs[:3])}): "
            "use another run.dir, or the same model settings to resume"
        )


# ---- "same run?" --------------------------------------------------------------------------------

# Settings that change how a run is executed, logged or evaluated, never the weights it produces:
# the jobs of one run may differ in these. Every other key (lr, seed, batch size, data, loss, the
# architecture, ds.gradient_clipping) is part of what the run is. train.max_steps is checked on
# its own: raising it continues the run. The job's shape may change between jobs of a run: the
# number of ranks, train.micro_batch_size, data.num_workers (a resume carries the data position
# across them: train/data_position.py), ds.zero_stage and ds.precision (a resume reshards the
# optimizer state: train/checkpoint.py), ds.extra (DeepSpeed's buckets, overlap, ...).
# (data.on_error may change the set of samples still to come, never what was trained so far.)
RUNTIME_KEYS = (
    "run.",
    "wandb.",
    "ray.",
    "eval.",
    "validate.",
    "ckpt",
    "train.max_steps",
    "train.time_limit_s",
    "train.checkpoint_every",
    "train.keep_last",
    "train.log_every",
    "train.eval_every",
    "train.eval_every_s",
    "train.eval_examples",
    "train.micro_batch_size",
    "train.resume",
    "train.init_from",
    "train.init_strict",
    "ds.zero_stage",
    "ds.precision",
    "ds.extra",
    "data.num_workers",
    "data.on_error",
    "data.eval_split",
    "data.extra_eval_roots",
    "data.cache_dir",
    *(f"model.{key}" for key in RUNTIME_MODEL_KEYS),
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_differences(saved_yaml: str, cfg: Config) -> list[str]:
    """The settings, runtime keys aside, in which a run's config.yaml and `cfg` differ. A key the
    saved config lacks (written by an older capsdist) counts as that key's default."""
    saved = _flat(yaml.safe_load(saved_yaml) or {})
    defaults = _flat(OmegaConf.to_container(OmegaConf.structured(Config)))
    now = _flat(yaml.safe_load(config_to_yaml(cfg)))
    return [
        f"{key}: {saved.get(key, defaults.get(key))!r} there, {value!r} here"
        for key, value in now.items()
        if not key.startswith(RUNTIME_KEYS) and saved.get(key, defaults.get(key)) != value
    ]


def check_resumable(run_dir: Path, cfg: Config) -> None:
    """Refuse, before anything in run.dir is written, a job that would make run.dir lie about
    its weights: another model's checkpoints, other settings than the run's own (finished or
    not), or train.max_steps below the newest checkpoint; or any checkpoint at all under
    train.resume=never. Nothing to refuse without one."""
    checkpoints = complete_checkpoints(run_dir / CHECKPOINTS)
    if not checkpoints:
        return
    if cfg.train.resume == "never":
        raise RunDirError(
            f"run.dir {run_dir} holds a run (checkpoints up to step {checkpoints[-1][0]}) and "
            "train.resume=never: use a new run.dir to start afresh, or train.resume=auto (or "
            "weights_only) to continue it"
        )
    check_same_model(run_dir / CHECKPOINTS, cfg.model)
    saved = run_dir / CONFIG
    diffs = run_differences(saved.read_text(), cfg) if saved.exists() else []
    if diffs:
        raise RunDirError(
            f"run.dir {run_dir} holds a run with other settings ({'; '.join(diffs[:3])}): "
            f"use a new run.dir for these settings, or {saved}'s to continue that run"
        )
    newest = checkpoints[-1][0]
    if cfg.train.max_steps < newest:
        raise RunDirError(
            f"run.dir {run_dir} has a checkpoint at step {newest}, past "
            f"train.max_steps={cfg.train.max_steps}: set train.max_steps >= {newest} to "
            "continue it, or use a new run.dir"
        )


# ---- the lock -----------------------------------------------------------------------------------


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold run.dir for one training job: an exclusive flock on run.dir/.lock, with this job's
    host and pid written in it. The kernel drops it when the process ends, however it ends, so
    there is never a stale lock. A job that finds it held is refused, naming the holder. (On NFS,
    Linux maps flock to POSIX locks, which the server keeps for every client.)"""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileExistsError, NotADirectoryError) as err:
        in_the_way = next(p for p in (run_dir, *run_dir.parents) if p.exists())
        raise RunDirError(
            f"run.dir {run_dir} cannot be a directory: {in_the_way} is a file; "
            "set run.dir to a directory"
        ) from err
    except OSError as err:
        raise RunDirError(
            f"run.dir {run_dir} cannot be written ({err.strerror}): set run.dir to a "
            "writable directory"
        ) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"run.dir {run_dir} is in use by {_holder(fd)}; wait for that job to end "
                "(or stop it), or use another run.dir"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname()}
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on host {holder['host']}"
    except (ValueError, KeyError, TypeError):  # taken an instant ago, not yet written
        return "another job"


# ---- writes the file system refused -------------------------------------------------------------

_REFUSED = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}


def storage_error(err: BaseException, run_dir: Path) -> RunDirError | None:
    """A one-line error for a write into run.dir that its file system refused (full, over
    quota, read-only), or None when `err` is something else. torch's checkpoint writer drops
    ENOSPC's errno (a RuntimeError, "unexpected pos") and safetensors raises its own
    SafetensorError, so any error while that file system has no space left counts as a full
    disk too."""
    reason = next(
        (_REFUSED[e.errno] for e in _chain(err) if isinstance(e, OSError) and e.errno in _REFUSED),
        None,
    )
    crashed = isinstance(err, Exception) and not isinstance(err, UserError)
    if reason is None and crashed and _free_bytes(run_dir) < 1 << 20:
        reason = _REFUSED[errno.ENOSPC]
    if reason is None:
        return None
    first_line = (str(err).splitlines() or [type(err).__name__])[0]
    return RunDirError(
        f"cannot write in run.dir {run_dir}: {reason} ({first_line}); the newest complete "
        "checkpoint is kept: make room (or lower train.keep_last) and rerun to resume"
    )


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62  # cannot tell: not a full disk as far as we know


def release_frames(err: BaseException) -> None:
    """Workaround: the frames of a write that failed still hold its file open (torch's checkpoint
    writer owns its own handle), and an open file keeps its blocks even once deleted. Clearing
    the locals of those frames closes it, so that removing the cut-short checkpoint frees space."""
    for e in _chain(err):
        traceback.clear_frames(e.__traceback__)


def remove_incomplete_checkpoints(ckpt_dir: Path) -> None:
    """Delete checkpoint folders without a marker (a save cut short): no resume ever reads them,
    and on a full disk they hold the space that status.json needs."""
    for folder in ckpt_dir.glob("step*"):
        if folder.is_dir() and not (folder / MARKER).exists():
            shutil.rmtree(folder, ignore_errors=True)


# ---- status -------------------------------------------------------------------------------------

ENDED = ("finished", "stopped", "failed")


def write_status(run_dir: Path, state: str, step: int, **details: str) -> None:
    """run.dir/status.json: `running` (step: where this job started), `finished` or `stopped`
    (the step reached; `reason`: the signal; a stopped run resumes when rerun), or `failed`
    (`error`; step: the newest checkpoint, where a rerun resumes). `capsdist validate` stops
    once the state is not `running`."""
    status = {"state": state, "step": step, "time": time.time(), **details}
    write_json_atomic(run_dir / STATUS, status)


def read_status(run_dir: Path) -> dict:
    """run.dir/status.json, or {} before training has written one."""
    status = run_dir / STATUS
    return json.loads(status.read_text()) if status.exists() else {}


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of run.dir/metrics.jsonl, oldest first ([] without the file); a line that does
    not parse (cut short by a kill while it was written) is left out."""
    path = run_dir / METRICS
    lines = path.read_text().splitlines() if path.exists() else []
    metrics = []
    for line in lines:
        try:
            metrics.append(json.loads(line))
        except ValueError:
            continue
    return [m for m in metrics if isinstance(m, dict)]
