"""Field docstrings of the schema (the string literal under each field), for `capsdist keys`."""

from __future__ import annotations

import ast
import inspect
from dataclasses import fields, is_dataclass

from capsdist.config import schema


def _class_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and is_doc and isinstance(node.target, ast.Name):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def field_docs(cls: type = schema.Config, prefix: str = "") -> dict[str, tuple[object, str]]:
    """Dotted key → (default, docstring) for every leaf of the schema."""
    docs = _class_docs(cls)
    instance = cls()
    out: dict[str, tuple[object, str]] = {}
    for f in fields(cls):
        value = getattr(instance, f.name)
        if is_dataclass(value):
            out.update(field_docs(type(value), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (value, docs.get(f.name, ""))
    return out
