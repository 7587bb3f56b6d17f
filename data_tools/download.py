"""Fetch a data set's files from its official location: checksums, retries, resume, safe unpacking.

Checksums are the published ones (MNIST, Fashion-MNIST, CIFAR-10: the md5s on the data sets'
pages, also in torchvision's sources; smallNORB: the md5s listed by the `disent` library).
affNIST publishes none: its files are fetched unchecked and say so (`md5=None`), and the
converter's meta.json records what was read. A partial download is kept as `NAME.part` and
resumed with an HTTP Range request; a finished file is only renamed into place after its
checksum matched, so a file under its real name is always complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data_tools.errors import DataToolError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One file of a data set: where it lives and its published md5 (None: none published)."""

    url: str
    md5: str | None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # yann.lecun.com refuses scripts
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_NORB = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/smallnorb-"
SOURCES: dict[str, tuple[Source, ...]] = {
    "mnist": (
        Source(_MNIST + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        Source(_MNIST + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        Source(_MNIST + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        Source(_MNIST + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "fashion_mnist": (
        Source(_FASHION + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        Source(_FASHION + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        Source(_FASHION + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        Source(_FASHION + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    "cifar10": (
        Source(
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
        ),
    ),
    "smallnorb": (
        Source(
            _NORB + "5x46789x9x18x6x2x96x96-training-dat.mat.gz", "66054832f9accfe74a0f4c36a75bc0a2"
        ),
        Source(
            _NORB + "5x46789x9x18x6x2x96x96-training-cat.mat.gz", "23c8b86101fbf0904a000b43d3ed2fd9"
        ),
        Source(
            _NORB + "5x01235x9x18x6x2x96x96-testing-dat.mat.gz", "e4ad715691ed5a3a5f138751a4ceb071"
        ),
        Source(
            _NORB + "5x01235x9x18x6x2x96x96-testing-cat.mat.gz", "5aa791cd7e6016cf957ce9bdb93b8603"
        ),
    ),
    # No checksum is published for affNIST (none found on its page or in public loaders).
    "affnist": (
        Source("https://www.cs.toronto.edu/~tijmen/affNIST/32x/transformed/test.mat.zip", None),
    ),
}


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


def download_dataset(
    dataset: str, dest: Path, *, mirror: str | None = None, progress: bool = True
) -> Path:
    """Fetch every file of `dataset` into `dest` (from `mirror` + file name if given)."""
    for source in SOURCES[dataset]:
        url = mirror.rstrip("/") + "/" + source.name if mirror else source.url
        fetch(url, Path(dest) / source.name, source.md5, progress=progress)
    return Path(dest)


def _safe_target(dest: Path, name: str, archive: Path) -> Path:
    """dest/name, refusing absolute names and any `..` that would leave `dest`."""
    path = PurePosixPath(name.replace("\\", "/"))
    target = (dest / path).resolve()
    if path.is_absolute() or ".." in path.parts or not target.is_relative_to(dest.resolve()):
        raise DataToolError(f"{archive}: member {name!r} would be written outside {dest}; refused")
    return target


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Unpack a .tar(.gz) or .zip into `dest`: regular files and folders only, never outside
    `dest` (no absolute paths, no `..`, no links, no devices). Returns `dest`."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    target = _safe_target(dest, info.filename, archive)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
            return dest
        with tarfile.open(archive) as tar:
            for member in tar:
                target = _safe_target(dest, member.name, archive)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                else:
                    raise DataToolError(
                        f"{archive}: member {member.name!r} is a link or device; refused"
                    )
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exn:
        if isinstance(exn, DataToolError):
            raise
        raise DataToolError(f"{archive}: cannot unpack ({exn})") from exn
    return dest
