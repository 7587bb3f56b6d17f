"""Fetch a data set's files from its official location (checksums, retries, resume) and unpack
archives safely. Which files and md5s: `data_tools.converters.CONVERTERS`.

A partial download is kept as `NAME.part` and resumed with an HTTP Range request; a finished
file is only renamed into place after its checksum matched, so a file under its real name is
always complete.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data_tools.destination import DataToolError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One file of a data set: where it lives and its published md5 (None: none published)."""

    url: str
    md5: str | None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    retries: int = 4,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), check its md5, return `dest`.

    A `dest` already there with the right md5 is kept. Network errors are retried `retries`
    times (waiting backoff, 2*backoff, ...), each retry resuming where the last stopped. A md5
    mismatch deletes the partial file and raises DataToolError naming the URL and both sums.
    """
    dest = Path(dest)
    if dest.is_file() and (md5 is None or _md5(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, part, timeout, progress)
            break
        except (urllib.error.URLError, OSError, TimeoutError) as exn:
            if isinstance(exn, urllib.error.HTTPError) and exn.code in (403, 404, 410):
                raise DataToolError(f"{url}: HTTP {exn.code}; the file is not there") from exn
            last_error = exn
    else:
        raise DataToolError(
            f"{url}: download failed after {retries + 1} attempts ({last_error}); run the same "
            f"command again to resume from {part}, or pass --src with the files"
        )
    if md5 is not None:
        found = _md5(part)
        if found != md5:
            part.unlink()
            raise DataToolError(
                f"{url}: checksum mismatch (md5 {found}, expected {md5}); the partial file was "
                f"deleted: run the command again, or fetch the file yourself and pass --src"
            )
    os.replace(part, dest)
    return dest


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One attempt: GET the rest of the file after `part`'s current size, appended to it."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https)
    except urllib.error.HTTPError as exn:
        if exn.code == 416 and have:  # nothing left to send: the part file is complete
            return
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored Range: start again from the beginning
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        bar = tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            desc=part.name.removesuffix(".part"),
            file=sys.stderr,
            disable=not progress,
        )
        with bar, open(part, "ab" if have else "wb") as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")


def download_files(
    sources: tuple[Source, ...], dest: Path, *, mirror: str | None = None, progress: bool = True
) -> Path:
    """Fetch every file of `sources` into `dest` (from `mirror` + file name if given)."""
    for source in sources:
        url = mirror.rstrip("/") + "/" + source.name if mirror else source.url
        fetch(url, Path(dest) / source.name, source.md5, progress=progress)
    return Path(dest)


def _refuse_absolute(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    # The "data" filter would extract `/tmp/x` as dest/tmp/x; an archive with absolute names
    # is none of the data sets' own, so it is refused, as `..` escapes are.
    if member.name.startswith(("/", "\\")):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Unpack a .tar(.gz) or .zip into `dest`, never outside it; returns `dest`.

    Tar goes through the standard library's "data" filter (PEP 706): no absolute names, no `..`
    escapes, no links that leave `dest`, no devices. Zip has no such filter: zipfile quietly
    rewrites `..` and absolute names to stay inside `dest`, but we refuse archives holding them
    (and zipfile never creates links).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    path = PurePosixPath(name.replace("\\", "/"))
                    if path.is_absolute() or ".." in path.parts:
                        raise DataToolError(
                            f"{archive}: member {name!r} would be written outside {dest}; refused"
                        )
                z.extractall(dest)
            return dest
        if not hasattr(tarfile, "data_filter"):
            raise DataToolError("unpacking needs Python >= 3.10.12 or 3.11.4 (tarfile filters)")
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter=_refuse_absolute)
    except tarfile.FilterError as exn:
        raise DataToolError(f"{archive}: {exn}; refused") from exn
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exn:
        raise DataToolError(f"{archive}: cannot unpack ({exn})") from exn
    return dest
