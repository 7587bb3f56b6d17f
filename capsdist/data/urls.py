"""Where data lives: a local folder or a URL, kept as the string the user gave.

`data.root` may be `/data/x`, `file:///data/x`, `http(s)://host/x`, `s3://bucket/x` or
`gs://bucket/x`; a shard may also be a `pipe:` command (`data.shards`). These are strings, never
`pathlib.Path`s: Path folds `http://host` into `http:/host`. `file://` URLs become plain paths
at once, so that local files take the fast, memory-mapped-free path of `open()` and the
per-machine checksum markers (checksum.py).

`data.shards` overrides the training shard list with a brace pattern (expanded by `braceexpand`,
as webdataset expands it) or `pipe:` commands. Every expanded entry must name one shard file of
meta.json (`.../train-000003.tar`, also inside a command), which gives its sample count and
sha256: the reader plans whole epochs up front (rank split, steps, exact resume) and never
trusts bytes that meta.json does not vouch for.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from braceexpand import braceexpand

from capsdist.errors import UserError

PIPE = "pipe:"
# Shard file names inside a URL or a shell command: the last path component ending in .tar.
_TAR_NAME = re.compile(r"[^/\s'\"=]+\.tar\b")


class DataError(UserError, ValueError):
    """Shards or meta.json are missing, unreachable or invalid; the message names the file or
    URL (and sample key) and what to do. A `UserError`: the CLI prints it as one line, exits 2.
    Defined here, at the bottom of the data package, so that every layer above can raise it."""


def is_remote(location: str | Path) -> bool:
    """True for URLs other than file:// (and for `pipe:` commands): read through fetch.py."""
    text = str(location)
    return text.startswith(PIPE) or ("://" in text and not text.startswith("file://"))


def local(location: str | Path) -> str:
    """`location` as a string; file:// URLs as the path they name."""
    text = str(location)
    if text.startswith("file://"):
        return unquote(urlparse(text).path)
    return text


def join(root: str | Path, name: str) -> str:
    """`root/name` for a folder or a URL (`s3://b/x` + `meta.json` → `s3://b/x/meta.json`)."""
    root = local(root)
    if is_remote(root):
        return f"{root.rstrip('/')}/{name}"
    return str(Path(root) / name)


def parent(location: str) -> str:
    """The folder or URL that holds `location`."""
    location = local(location)
    if is_remote(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def describe(location: str | Path) -> str:
    """For messages and meta.json's `source`: URLs as given, local paths made absolute."""
    location = local(location)
    return location if is_remote(location) else str(Path(location).resolve())


def shard_name(url: str) -> str | None:
    """The shard file a URL or `pipe:` command reads: its last `*.tar` component."""
    names = _TAR_NAME.findall(url)
    return names[-1] if names else None


def expand_shards(pattern: str, known: list[str], where: str) -> list[tuple[str, str]]:
    """(shard name, URL or command) for each entry of the brace `pattern`; every entry must
    read a shard of `known` (the split's shards in meta.json at `where`), each at most once."""
    entries = [local(entry) for entry in braceexpand(pattern)]
    known_set, seen, pairs = set(known), set(), []
    for entry in entries:
        name = shard_name(entry)
        if name not in known_set:
            raise DataError(
                f"data.shards: {entry!r} reads no shard that {where} lists (it has "
                f"{known[0]} ... {known[-1]}); name shards as meta.json does, or index "
                f"them first with `capsdist data index SHARDS --out DIR` and set data.root=DIR"
            )
        if name in seen:
            raise DataError(f"data.shards: {name} appears twice in {pattern!r}")
        seen.add(name)
        pairs.append((name, entry))
    return pairs
