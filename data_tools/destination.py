"""Where `capsdist data ... --out` writes: a local folder, or a URL (`s3://`, `gs://`, ...).

Shards are always written to a local folder first, by the one ShardWriter (shards.py). For a
URL each shard is uploaded through fsspec as soon as it is complete, then deleted: the local
disk holds one shard at a time, however large the data set, and nothing is streamed half-done
to the store. The rules are the same both ways: an `--out` that holds another data set (or
other data of this one) is refused before anything is written; meta.json is removed first and
written last, so a folder or prefix with a meta.json always holds a complete data set; shards
of an earlier, other sharding are removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from capsdist.data.checksum import cache_home
from capsdist.data.fetch import NotFound, filesystem, read_bytes, retrying
from capsdist.data.meta import META_NAME
from capsdist.data.urls import PIPE, is_remote, join, local
from capsdist.errors import UserError
from capsdist.run_dir import write_text_atomic

REMEDY = "choose another --out or delete that folder first"
DOWNLOAD_DIR = ".download"  # inside --out: kept, so an interrupted download resumes


class DataToolError(UserError, ValueError):
    """The one error of `data_tools`: a converter cannot go on; the one-line message names the
    file or folder at fault. A `UserError`: `capsdist data` prints it and exits with 2."""


class Destination:
    """The `--out` of a converter; `staging` is the local folder its ShardWriter writes to."""

    def __init__(self, out: str | Path):
        self.out = local(out)
        self.remote = is_remote(self.out)
        if self.out.startswith(PIPE) or self.out.split("://")[0] in ("http", "https"):
            raise DataToolError(
                f"--out {self.out}: cannot write there; give a folder, or an object store URL "
                f"(s3://bucket/prefix, gs://bucket/prefix)"
            )
        self._staging: Path | None = None

    @property
    def staging(self) -> Path:
        """The local folder shards are written to: --out itself, or a temporary folder."""
        if self._staging is None:
            self._staging = (
                Path(tempfile.mkdtemp(prefix="capsdist-upload-")) if self.remote else Path(self.out)
            )
        return self._staging

    def existing_meta(self, dataset: str) -> dict[str, Any] | None:
        """The meta.json already at --out (None: there is none); DataToolError if it is
        unreadable or holds another data set."""
        path = join(self.out, META_NAME)
        try:
            text = _read_text(path)
        except NotFound:
            return None
        try:
            old = json.loads(text)
            old_dataset = old["dataset"]
        except (ValueError, KeyError, TypeError) as exn:
            raise DataToolError(
                f"{path}: exists but is not a capsdist meta.json ({exn}); refusing to write "
                f"into {self.out}: {REMEDY}"
            ) from exn
        if old_dataset != dataset:
            raise DataToolError(
                f"{self.out}: already holds data set {old_dataset!r}; refusing to replace it "
                f"with {dataset!r}: {REMEDY}"
            )
        return old

    def claim(self, dataset: str, fingerprint: str) -> dict[str, Any] | None:
        """Refuse --out if it holds other data; return its old meta.json, if any, after
        removing it: until the new one is written, --out must not look complete."""
        if not self.remote:
            try:
                Path(self.out).mkdir(parents=True, exist_ok=True)
            except OSError as exn:
                raise DataToolError(f"{self.out}: cannot create the output folder ({exn})") from exn
        old = self.existing_meta(dataset)
        if old is not None and old.get("fingerprint") != fingerprint:
            raise DataToolError(
                f"{self.out}: already holds different {dataset!r} data (other source, seed or "
                f"content); refusing to replace it: {REMEDY}"
            )
        if old is not None:
            self.remove([META_NAME])
        return old

    def finish_shard(self, path: Path) -> None:
        """A complete shard in `staging`: uploaded and deleted locally when --out is a URL."""
        if self.remote:
            url = join(self.out, path.name)
            fs, target = filesystem(url)
            retrying(url, "upload", lambda: fs.put_file(str(path), target))
            path.unlink()

    def publish(self, meta_text: str) -> None:
        """Write meta.json: the data set is complete."""
        if not self.remote:
            write_text_atomic(Path(self.out) / META_NAME, meta_text)
            return
        url = join(self.out, META_NAME)
        fs, target = filesystem(url)
        retrying(url, "upload", lambda: fs.pipe_file(target, meta_text.encode()))

    def remove(self, names: list[str]) -> None:
        """Delete these files of --out, if they exist."""
        for name in names:
            if not self.remote:
                (Path(self.out) / name).unlink(missing_ok=True)
                continue
            url = join(self.out, name)
            fs, target = filesystem(url)
            with contextlib.suppress(NotFound):  # already gone: what we wanted
                retrying(url, "delete", lambda target=target, fs=fs: fs.rm_file(target))

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc_info) -> None:
        # The temporary staging folder of a URL --out: shards not yet uploaded when it failed.
        if self.remote and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def check_out_folder(out: str | Path, dataset: str) -> dict[str, Any] | None:
    """The meta.json already at `out` (None: there is none); DataToolError if it is unreadable
    or holds another data set. Converters call it before a long download, not after."""
    return Destination(out).existing_meta(dataset)


def download_dir(out: str, dataset: str) -> Path:
    """Where raw files are downloaded: --out/.download, or for a URL --out this machine's
    cache (`$CAPSDIST_CACHE_DIR/downloads/DATASET`): kept, so an interrupted download resumes."""
    if is_remote(out):
        return cache_home() / "downloads" / dataset
    return Path(out) / DOWNLOAD_DIR


def _read_text(path: str) -> str:
    if is_remote(path):
        return read_bytes(path).decode("utf-8", "replace")
    try:
        return Path(path).read_text()
    except FileNotFoundError as exn:
        raise NotFound(path) from exn
    except OSError as exn:
        raise DataToolError(f"{path}: exists but cannot be read ({exn}); {REMEDY}") from exn
