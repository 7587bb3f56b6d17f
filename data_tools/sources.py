"""Where a converter's raw files come from: --src, a default folder, or a download."""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.download import download_dataset
from data_tools.errors import DataToolError

DOWNLOAD_DIR = ".download"  # inside --out: kept, so an interrupted download resumes


def resolve_src(
    dataset: str,
    src: str | Path | None,
    out: str | Path,
    *,
    default_src: str | Path | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> Path:
    """`src` if given; else `default_src` if it exists; else download into out/.download."""
    if src:
        src = Path(src)
        if not src.exists():
            raise DataToolError(f"{src}: --src does not exist")
        return src
    if default_src and Path(default_src).exists():
        return Path(default_src)
    refuse_other_dataset(Path(out), dataset)  # before a long download, not after
    return download_dataset(dataset, Path(out) / DOWNLOAD_DIR, mirror=mirror, progress=progress)


def refuse_other_dataset(out: Path, dataset: str) -> None:
    """Early form of `claim_out_folder`'s check: `out` must not hold another data set."""
    meta = out / "meta.json"
    try:
        other = json.loads(meta.read_text()).get("dataset") if meta.is_file() else None
    except (OSError, ValueError, AttributeError):
        other = "?"
    if other is not None and other != dataset:
        raise DataToolError(
            f"{out}: already holds data set {other!r}; refusing to write {dataset!r} there: "
            f"choose another --out or delete that folder first"
        )
