"""`capsdist keys`: every config key with its default and meaning."""

from __future__ import annotations

import argparse
import sys


def _keys(args: argparse.Namespace) -> dict:
    from capsdist.config.docs import field_docs

    docs = field_docs()
    for key, (default, doc) in docs.items():
        print(f"{key} = {default!r}\n    {doc}", file=sys.stderr)
    return {"num_keys": len(docs)}


def register(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="list every config key with its default and meaning")
    keys.set_defaults(func=_keys)
