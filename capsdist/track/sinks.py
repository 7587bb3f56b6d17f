"""Where metrics go: metrics.jsonl, W&B and the progress bar. Only the main rank builds them."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from capsdist.config.schema import WandbConfig


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """One JSON object a line, appended (a resumed run continues the same file). A job that
    resumed at step `resumed_at` first drops the lines after it: it replays those steps and
    would log them twice. Every line is one append to a freshly opened file, so a writer beside
    it (`capsdist validate`) never writes into a file that a resumed job has replaced."""

    def __init__(self, path: Path, resumed_at: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        if resumed_at is not None and path.exists():
            _drop_lines_after(path, resumed_at)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        line = json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n"
        with open(self._path, "a") as f:
            f.write(line)

    def close(self) -> None:
        """Nothing is held open between lines."""


def _drop_lines_after(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step`, replacing the file atomically (temp file + rename:
    a crash leaves the old file). A line that does not parse (cut short by a kill) goes too."""
    lines = path.read_text().splitlines()
    steps = [_step_of(line) for line in lines]
    kept = [line for line, n in zip(lines, steps, strict=True) if n is not None and n <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class WandbSink:
    """A W&B run (offline by default). Its id is kept in the run directory so that a restarted
    job resumes the same W&B run instead of starting a new one. Only the config is logged,
    never the environment (which may hold WANDB_API_KEY)."""

    def __init__(self, run_dir: Path, cfg: WandbConfig, config: dict, job_type: str):
        import wandb

        id_file = run_dir / f"wandb_{job_type}_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(
            project=cfg.project,
            mode=cfg.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config,
            job_type=job_type,
            group=cfg.group or None,
            tags=cfg.tags or None,
            name=f"{run_dir.name}-{job_type}",
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A W&B table (sweep results, ensemble members): one panel in the project."""
        import wandb

        self._run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        """PNG files as W&B images (figures drawn at an evaluation)."""
        log_images(self._run, step, images)

    def summary(self, values: dict) -> None:
        self._run.summary.update(values)

    def log_model(self, path: Path, name: str, aliases: list[str], metadata: dict) -> None:
        """Exported weights as a W&B model artifact `name` (one per run directory: the final
        weights and validate's best are versions of it, told apart by their aliases), with
        `metadata` (config, step, accuracy). Offline, W&B keeps a copy under
        $WANDB_DATA_DIR/artifacts/staging (default ~/.local/share/wandb) until `wandb sync`
        uploads it. A failure to log costs the artifact, not the job that made the weights."""
        import wandb

        try:
            artifact = wandb.Artifact(name, type="model", metadata=_json_finite(metadata))
            artifact.add_file(str(path), name=path.name)
            self._run.log_artifact(artifact, aliases=aliases)
        except (OSError, ValueError, wandb.Error) as err:
            print(f"warning: W&B model artifact {name} not logged: {err}", file=sys.stderr)

    def close(self) -> None:
        self._run.finish()


def log_model_artifact(
    sinks: list, path: Path, run_dir: Path, aliases: list[str], metadata: dict
) -> None:
    """Log exported weights as run_dir's model artifact through the W&B sink among `sinks`, if
    there is one (wandb.mode=disabled: none)."""
    for sink in sinks:
        if isinstance(sink, WandbSink):
            sink.log_model(path, model_artifact_name(run_dir), aliases, metadata)


def model_artifact_name(run_dir: Path) -> str:
    """The W&B artifact name of a run directory's weights: letters, digits, `-`, `_`, `.`."""
    return "model-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", run_dir.resolve().name) or "run")


def _json_finite(value):
    """`value` with NaN / inf floats as None: W&B metadata is JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_finite(v) for v in value]
    return value


def build_wandb_sink(
    run_dir: Path, cfg: WandbConfig, config: dict, job_type: str
) -> WandbSink | None:
    """A W&B run for this job, or None with `wandb.mode=disabled`: the one place that decides
    whether a job logs to W&B (W&B is imported only when it does)."""
    if cfg.mode == "disabled":
        return None
    return WandbSink(run_dir, cfg, config, job_type)


def log_images(run, step: int | None, images: dict[str, Path]) -> None:
    """Log PNG files to a W&B run (e.g. `wandb.run`, the training loop's live run)."""
    import wandb

    run.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)


class ProgressBar:
    """Progress on stderr (stdout is kept for the final JSON line). On a terminal, a tqdm bar. In
    a batch job's log (SLURM, CI, `> file`: no TTY) a bar's carriage-return updates pile up into
    one line of megabytes, so there it prints a plain line every $CAPSDIST_PROGRESS_EVERY_S
    seconds (default 30) and one at the end: position, the latest values, rate and ETA."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "train",
        unit: str = "step",
        plain: bool | None = None,
    ):
        self._plain = not sys.stderr.isatty() if plain is None else plain
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
            disable=self._plain,
        )
        self._desc, self._unit, self._total = desc, unit, total
        self._n = self._first = initial
        self._postfix: dict[str, float | str] = {}
        self._started = self._printed = time.monotonic()
        self._every_s = float(os.environ.get("CAPSDIST_PROGRESS_EVERY_S", "30"))

    def update(self, n: int = 1, **postfix: float | str) -> None:
        if not self._plain:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
            return
        self._n += n
        self._postfix.update(postfix)
        if time.monotonic() - self._printed >= self._every_s:
            self._print_line()

    def _print_line(self) -> None:
        now = self._printed = time.monotonic()
        rate = (self._n - self._first) / max(now - self._started, 1e-9)
        position = f"{self._n}/{self._total}" if self._total else str(self._n)
        words = [f"{self._desc}: {position} {self._unit}s"]
        words += [f"{key}={value}" for key, value in self._postfix.items()]
        words.append(f"{rate:.2f} {self._unit}s/s")
        if self._total and rate > 0:
            words.append(f"ETA {tqdm.format_interval((self._total - self._n) / rate)}")
        print(" ".join(words), file=sys.stderr, flush=True)

    def set_total(self, total: int) -> None:
        """A new expected end (a time budget's, re-estimated as the steps per second settle)."""
        self._total = total
        if not self._plain:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        if not self._plain:
            self._bar.close()
        elif self._n > self._first:  # where it ended
            self._print_line()
