"""Whole objects from URLs, through fsspec and webdataset: retried, then one line that says what.

`http(s)://`, `s3://` (s3fs) and `gs://` (gcsfs, if installed) go through fsspec; `pipe:`
commands through webdataset's `gopen`, as webdataset users write them. Not webdataset's curl
handler for HTTP: it runs one `curl` process per shard (~14 ms for a 2 MB MNIST shard on
loopback, fsspec 2.5 ms) and retries 30 times by itself, which would hide an outage for a minute.
S3 endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...), read by botocore as boto3 users expect.
Objects larger than STREAM_CHUNK are streamed into one buffer of their size, so that a 100 MB
shard costs 100 MB, not the 200+ MB of a whole-response read (`_read_stream`).

Errors fall in three kinds. Missing (HTTP 404, NoSuchKey): `NotFound`, which the reader may skip
and count under data.on_error=skip. Transient (connection refused or reset, timeouts, HTTP 5xx
and 429, a `pipe:` command that fails): retried RETRIES times with exponential backoff from
`$CAPSDIST_FETCH_RETRY_DELAY` seconds (default 1: 1+2+4+8 s, plus s3fs's own retries), then a
DataError naming the URL. Anything else (no credentials, access denied, no gcsfs) at once.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from capsdist.data.urls import PIPE, DataError

RETRIES = 4
STREAM_CHUNK = 8 << 20  # bytes per read of a remote object: the most held twice at once
T = TypeVar("T")
_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL "
    "for an S3 server other than AWS"
)
_TRANSIENT_NAMES = {  # botocore's connection errors are not OSErrors; aiohttp's payload errors
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientPayloadError",
    "ServerDisconnectedError",
}
_jitter = random.Random()  # private: the global RNG may be seeded by the training code


class NotFound(DataError):
    """The object does not exist (HTTP 404, S3 NoSuchKey / NoSuchBucket)."""


def retry_delay() -> float:
    """Seconds before the first retry; doubled for each further one."""
    return float(os.environ.get("CAPSDIST_FETCH_RETRY_DELAY", "1"))


def filesystem(url: str) -> tuple[Any, str]:
    """fsspec's (filesystem, path) for `url`; DataError when its scheme needs a missing package."""
    import fsspec  # imported on first use: local data needs neither fsspec nor aiohttp

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exn:
        raise DataError(f"{url}: {_one_line(exn)}") from exn
    except ValueError as exn:  # "Protocol not known"
        raise DataError(f"{url}: cannot open this kind of URL ({_one_line(exn)})") from exn


def read_bytes(url: str, large: bool = True) -> bytes | bytearray:
    """The whole object at `url` (a URL or a `pipe:` command); NotFound or DataError.

    `large=False` promises an object of at most STREAM_CHUNK bytes, read in one request (the
    reader knows from meta.json); otherwise it is streamed into a buffer of its size."""
    return retrying(url, "read", lambda: _read_once(url, large))


def retrying(url: str, doing: str, attempt: Callable[[], T]) -> T:
    """`attempt()`, retried with backoff on transient errors; errors become DataErrors that
    name `url` (NotFound for a missing object). `doing` says what failed: "read", "upload"."""
    started = time.monotonic()
    for tries in range(RETRIES + 1):
        try:
            return attempt()
        except DataError:  # already names the URL and what to do (filesystem())
            raise
        except Exception as exn:
            kind, reason = _classify(url, exn)
            if kind is None:  # not a failure of the store or the network: a bug, shown whole
                raise
            if kind == "missing":
                raise NotFound(f"{url}: not found" + (f" ({reason})" if reason else "")) from exn
            if kind == "fatal":
                raise DataError(f"{url}: cannot {doing}: {reason}") from exn
            if tries == RETRIES:
                waited = time.monotonic() - started
                check = "the command" if url.startswith(PIPE) else "the server and the network"
                raise DataError(
                    f"{url}: cannot {doing} after {RETRIES + 1} tries over {waited:.0f} s "
                    f"({reason}); check {check}, then run again"
                ) from exn
            time.sleep(retry_delay() * 2**tries * _jitter.uniform(0.75, 1.25))
    raise AssertionError("unreachable")


def _read_once(url: str, large: bool) -> bytes | bytearray:
    if url.startswith(PIPE):
        from webdataset.gopen import gopen

        stream = gopen(url, "rb")  # the command's stderr goes to ours: it says what went wrong
        try:
            with stream:
                return stream.read()
        except OSError:  # webdataset's Pipe raises on a non-zero exit, with a page of details
            raise OSError(f"the command exited with status {stream.status}") from None
    if not large:  # one GET, no HEAD first: ~10 % more MNIST samples/s over loopback HTTP
        fs, path = filesystem(url)
        return fs.cat_file(path)
    return _read_stream(url)


def _read_stream(url: str) -> bytes | bytearray:
    """The object at `url`, read in chunks into one buffer of its size (a HEAD request first).

    Not fsspec's `cat_file`: aiohttp joins the chunks of a whole response (twice the object in
    memory for a moment) and its response object keeps the result alive until the cyclic GC
    runs: with 100 MB shards, prefetching, a reader held 4 shards' worth instead of 2.
    """
    fs, path = filesystem(url)
    size = fs.size(path)
    if not size:  # the server does not say (or the object is empty): one whole read
        return fs.cat_file(path)
    buffer = bytearray(size)
    view, pos = memoryview(buffer), 0
    # HTTP: one streamed GET (servers such as http.server ignore ranges); object stores:
    # one ranged GET per chunk, no read-ahead cache (which would hold another copy).
    http = url.split("://", 1)[0] in ("http", "https")
    options = {"block_size": 0} if http else {"block_size": STREAM_CHUNK, "cache_type": "none"}
    with fs.open(path, "rb", **options) as stream:
        while pos < size:
            chunk = stream.read(min(STREAM_CHUNK, size - pos))
            if not chunk:
                raise ConnectionError(f"the transfer ended after {pos} of {size} bytes")
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
    return buffer


def _one_line(exn: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exn).split()) or type(exn).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _classify(url: str, exn: Exception) -> tuple[str | None, str]:
    """("missing" | "fatal" | "transient", why) for an exception of fsspec, s3fs or a pipe;
    (None, ...) for one that is no failure of a store, a server or the network."""
    if isinstance(exn, FileNotFoundError) and isinstance(exn.__cause__, Exception):
        # fsspec's HTTP `size` says "not found" for any failure: a refused connection too
        kind, reason = _classify(url, exn.__cause__)
        if kind is not None:
            return kind, reason
    names = {cls.__name__ for cls in type(exn).__mro__}
    status = getattr(exn, "status", None)  # aiohttp's ClientResponseError: the HTTP status
    reason = _one_line(exn)
    if isinstance(exn, FileNotFoundError) or status == 404:
        # s3fs and fsspec say which path; only a missing bucket is worth repeating
        return "missing", "" if reason.strip("/") in url or status == 404 else reason
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return "fatal", f"no S3 credentials found: {_CREDENTIALS}"
    if isinstance(exn, PermissionError) or status in (401, 403):
        hint = f"; check the credentials: {_CREDENTIALS}" if url.startswith("s3://") else ""
        return "fatal", f"access denied ({reason}){hint}"
    if isinstance(status, int):
        kind = "transient" if status >= 500 or status == 429 else "fatal"
        return kind, f"HTTP {status} {getattr(exn, 'message', '')}".strip()
    if isinstance(exn, OSError) and exn.errno == errno.EINVAL:  # s3fs: InvalidBucketName, ...
        return "fatal", reason
    if isinstance(exn, (OSError, TimeoutError)) or names & _TRANSIENT_NAMES:
        return "transient", reason
    return None, reason
