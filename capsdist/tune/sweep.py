"""`capsdist sweep`: run a sweep file with Ray Tune, then tabulate the trials and keep the best.

Sweep directory: `ray/` (Tune's experiment state, what `--resume` restores; with
`ray.storage_path` set it is `<ray.storage_path>/<sweep name>` instead, as capsdist/tune/storage.py
decides for every Ray run), `trials/<id>/` (each trial's run.dir: config, checkpoints, metrics,
weights), `sweep_results.csv` and `.md`, `best_config.yaml`, `sweep.json`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from capsdist.config import config_to_yaml, load_config
from capsdist.data import is_remote, read_meta
from capsdist.run_dir import write_json_atomic, write_text_atomic
from capsdist.track import ProgressBar, build_wandb_sink
from capsdist.tune.spec import Dimension, SweepError, SweepSpec, format_override
from capsdist.tune.storage import check_storage, experiment_path, is_url, ray_storage
from capsdist.tune.trial import TrialBase, train_trial

# The sweep's progress bar. Tune pickles its callbacks into the experiment state and, on
# `--resume`, uses the unpickled ones: so `TrialProgress` holds no state and updates whichever bar
# `run_sweep` opened in this process, which also keeps tqdm's stream wrapper out of the pickle.
_BAR: ProgressBar | None = None


class TrialProgress(tune.Callback):
    def on_trial_complete(self, iteration, trials, trial, **info):
        if _BAR is not None:
            _BAR.update(1, last=trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        if _BAR is not None:
            _BAR.update(1, error=trial.trial_id)


def _tune_domain(dim: Dimension):
    if dim.kind == "grid":
        return tune.grid_search(dim.values)
    if dim.kind == "choice":
        return tune.choice(dim.values)
    if dim.kind == "uniform":
        return tune.uniform(*dim.values)
    return tune.loguniform(*dim.values)


def _trial_base(spec: SweepSpec) -> TrialBase:
    base = spec.base_config()
    read_meta(base.data.root)  # before Ray starts: data.root set, and shards there
    root = base.data.root  # absolute: Ray runs trials in a working directory of their own
    data_root = format_override(
        "data.root", root if is_remote(root) else str(Path(root).absolute())
    )
    return TrialBase(
        configs=tuple(str(Path(c).absolute()) for c in spec.sweep.configs),
        overrides=(*spec.overrides, data_root),
        runs_dir=str(spec.dir / "trials"),
        metric=spec.sweep.metric,
        group=spec.sweep.name,
        tags=("sweep", spec.sweep.name),
        figures=spec.sweep.figures,
        workers=spec.sweep.workers_per_trial,
        cpus_per_worker=spec.sweep.cpus_per_trial,
        gpus_per_worker=spec.sweep.gpus_per_trial,
    )


def _scheduler(spec: SweepSpec):

    if spec.sweep.scheduler == "fifo":
        return FIFOScheduler()
    train = spec.base_config().train
    interval = train.eval_every if spec.sweep.metric.startswith("eval_") else train.log_every
    return ASHAScheduler(
        time_attr="training_iteration",  # one per report
        max_t=max(math.ceil(train.max_steps / interval), 1),
        grace_period=spec.sweep.asha_grace_period,
        reduction_factor=spec.sweep.asha_reduction_factor,
    )


def _tuner(spec: SweepSpec, resume: bool, bar_callback):

    if spec.sweep.workers_per_trial == 1:
        resources = {"cpu": spec.sweep.cpus_per_trial, "gpu": spec.sweep.gpus_per_trial}
    else:
        # Workaround: the trial's own process only waits on its Ray Train workers, which reserve
        # their CPUs/GPUs in a placement group of their own; Tune refuses an all-zero request,
        # so the trial asks for one byte of memory (any CPU share would leave a machine whose
        # CPUs the workers fill exactly waiting forever).
        resources = {"memory": 1}
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=_trial_base(spec)), resources
    )
    storage_path, name = ray_storage(spec.base_config().ray.storage_path, spec.dir, spec.sweep.name)
    check_storage(storage_path)
    state = experiment_path(storage_path, name)
    if resume:
        if not tune.Tuner.can_restore(state):
            raise SweepError(f"--resume: no sweep state in {state}; start it without --resume")
        # Unfinished and failed trials start again; each resumes from the last DeepSpeed
        # checkpoint in its own run.dir (trials/<id>), so finished steps are not redone.
        return tune.Tuner.restore(state, trainable, resume_unfinished=True, restart_errored=True)
    if tune.Tuner.can_restore(state) if is_url(state) else Path(state).exists():
        raise SweepError(
            f"{state} holds an earlier sweep: pass --resume to continue it, or set sweep.dir=NEW"
        )
    return tune.Tuner(
        trainable,
        param_space={dim.key: _tune_domain(dim) for dim in spec.space},
        tune_config=tune.TuneConfig(
            metric=spec.sweep.metric,
            mode=spec.sweep.mode,
            scheduler=_scheduler(spec),
            num_samples=spec.sweep.num_samples,
            max_concurrent_trials=_max_concurrent_trials(spec),
            time_budget_s=spec.sweep.time_budget_s or None,
            reuse_actors=False,  # a fresh process per trial: no rendezvous state carried over
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=[bar_callback],
            verbose=0,  # our progress bar on stderr; stdout keeps the table and the JSON line
        ),
    )


def _max_concurrent_trials(spec: SweepSpec) -> int | None:
    """sweep.max_concurrent_trials, or for multi-worker trials as many as the cluster's CPUs
    and GPUs hold: their Tune processes reserve nothing, so Tune alone would start every
    trial at once, each waiting for its workers' resources."""

    sweep = spec.sweep
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    if sweep.workers_per_trial == 1:
        return None  # each trial reserves its CPUs/GPUs: Tune packs them itself
    total = ray.cluster_resources()
    fits = total.get("CPU", 0) // (sweep.workers_per_trial * sweep.cpus_per_trial)
    if sweep.gpus_per_trial:
        fits = min(fits, total.get("GPU", 0) // (sweep.workers_per_trial * sweep.gpus_per_trial))
    return max(int(fits), 1)


def _check_trial_fits(spec: SweepSpec) -> None:
    """A trial asking for more than the local Ray instance has would wait forever."""

    sweep = spec.sweep
    if sweep.ray_address:
        return  # an autoscaling cluster may grow to fit
    total = ray.cluster_resources()
    need = {
        "CPU": sweep.workers_per_trial * sweep.cpus_per_trial,
        "GPU": sweep.workers_per_trial * sweep.gpus_per_trial,
    }
    for name, amount in need.items():
        if amount > total.get(name, 0) + 1e-9:
            raise SweepError(
                f"one trial needs {amount:g} {name}s (sweep.workers_per_trial="
                f"{sweep.workers_per_trial} x sweep.{name.lower()}s_per_trial) but Ray has "
                f"{total.get(name, 0):g}: lower them, or raise sweep.ray_num_cpus"
            )


def _init_ray(spec: SweepSpec) -> None:

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if spec.sweep.ray_address:
        ray.init(address=spec.sweep.ray_address, log_to_driver=False)
        return
    ray.init(
        num_cpus=spec.sweep.ray_num_cpus or None,
        include_dashboard=False,
        # The default object store would reserve ~30% of RAM; trials pass no large objects.
        object_store_memory=100 * 2**20,
        log_to_driver=False,  # trials' own progress bars would interleave with ours
    )


class _InterruptWatch(logging.Handler):
    """Notices Tune's "Stop signal received" warning. Workaround: on SIGINT Tune stops the
    running trials as if they had completed and fit() returns normally; its log line is the
    one sign of the interruption that the public API gives."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = self.seen or record.getMessage().startswith("Stop signal received")


def run_sweep(spec: SweepSpec, resume: bool = False) -> dict:
    """Run (or resume) the sweep; write the results table and the best config."""
    global _BAR
    _BAR = ProgressBar(spec.num_trials(), desc="sweep", unit="trial")
    _init_ray(spec)
    interrupted = _InterruptWatch()
    logging.getLogger("ray.tune.tune").addHandler(interrupted)
    try:
        _check_trial_fits(spec)
        # Tune prints its own status boxes even at verbose=0: keep stdout for table and JSON.
        with contextlib.redirect_stdout(sys.stderr):
            grid = _tuner(spec, resume, TrialProgress()).fit()
    finally:
        logging.getLogger("ray.tune.tune").removeHandler(interrupted)
        _BAR.close()
        _BAR = None
        ray.shutdown()
    if interrupted.seen:  # Ctrl+C: Tune saved its state, stopped the trials and returned
        raise SweepError(
            f"interrupted before every trial finished; continue with "
            f"`capsdist sweep -c {spec.path} --resume` (same key=value arguments)"
        )
    rows = _rows(spec, grid)
    if not any(math.isfinite(r[spec.sweep.metric]) for r in rows):
        errors = [str(r.error).strip().splitlines()[-1] for r in grid if r.error]
        raise SweepError(
            f"no trial of {spec.path} reported {spec.sweep.metric}"
            + (f"; first error: {errors[0]}" if errors else "")
        )
    return _write_results(spec, rows)


def _rows(spec: SweepSpec, grid) -> list[dict]:
    """One row per trial: id, the space's values, the metric and the trial's last numbers."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        row = {"trial": trial_id}
        row.update({dim.key: config.get(dim.key) for dim in spec.space})
        row[spec.sweep.metric] = float(metrics.get(spec.sweep.metric, math.nan))
        row["train_accuracy"] = float(metrics.get("train_accuracy", math.nan))
        row["step"] = int(metrics.get("step", 0))
        row["status"] = "error" if result.error else "ok"
        row["run_dir"] = metrics.get("run_dir", "")
        rows.append(row)
    sign = -1 if spec.sweep.mode == "max" else 1
    metric = spec.sweep.metric
    rows.sort(key=lambda r: (not math.isfinite(r[metric]), sign * r[metric], r["trial"]))
    return rows


def _markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _write_results(spec: SweepSpec, rows: list[dict]) -> dict:
    metric = spec.sweep.metric
    best = rows[0]
    best_params = {dim.key: best[dim.key] for dim in spec.space}
    out = spec.dir
    table = _markdown([{k: v for k, v in r.items() if k != "run_dir"} for r in rows])
    write_text_atomic(out / "sweep_results.md", table)
    write_text_atomic(out / "sweep_results.csv", _csv(rows))
    best_overrides = [*spec.overrides, *(format_override(k, v) for k, v in best_params.items())]
    best_cfg = load_config(spec.sweep.configs, best_overrides)
    best_cfg.run.dir = str(Path("runs") / f"{spec.sweep.name}-best")
    header = (
        f"# Best trial ({best['trial']}) of the sweep {spec.path}: {metric}={best[metric]:.4f}.\n"
        f"# Its values: {best_params}. Retrain it with:\n"
        f"#   capsdist train -c {out / 'best_config.yaml'}\n"
    )
    write_text_atomic(out / "best_config.yaml", header + config_to_yaml(best_cfg))
    print(table, end="", flush=True)
    result = {
        "num_trials": len(rows),
        "num_errors": sum(r["status"] == "error" for r in rows),
        "metric": metric,
        "best_config": best_params,
        "best_accuracy": best[metric],
        "best_trial": best["trial"],
        "best_run_dir": best["run_dir"],
        "sweep_dir": str(out),
    }
    write_json_atomic(out / "sweep.json", {**result, "sweep": asdict(spec.sweep)})
    _log_to_wandb(spec, rows, result)
    return result


def _log_to_wandb(spec: SweepSpec, rows: list[dict], result: dict) -> None:
    """One `sweep` run in the trials' W&B group holding the results table."""
    base = spec.base_config()
    base.wandb.group = spec.sweep.name
    base.wandb.tags = ["sweep", spec.sweep.name]
    sink = build_wandb_sink(spec.dir, base.wandb, {"sweep": asdict(spec.sweep)}, job_type="sweep")
    if sink is None:
        return
    try:
        sink.log_table("sweep/results", list(rows[0]), [list(r.values()) for r in rows])
        sink.summary({k: v for k, v in result.items() if k != "best_config"})
    finally:
        sink.close()
