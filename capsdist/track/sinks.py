"""Where metrics go: metrics.jsonl, W&B and the progress bar. Only the main rank builds them."""

from __future__ import annotations

import json
import os
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
    """One JSON object a line, appended (a resumed run continues the same file)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 - open for the whole run, closed in close()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(
            json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n"
        )
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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

    def close(self) -> None:
        self._run.finish()


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
    """A tqdm bar on stderr (stdout is kept for the final JSON line)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", unit: str = "step"):
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def update(self, n: int = 1, **postfix: float | str) -> None:
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
