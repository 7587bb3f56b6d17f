"""Load a typed `Config` from YAML presets and `key=value` overrides; list every key's docs.

Unknown keys are errors that name the closest valid key, wherever they come from (a YAML file or
the command line). OmegaConf does the merging and type checks; the dataclasses' `__post_init__`
does the cross-field rules.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capsdist.config.schema import Config, ConfigError

# The reference's `--hparams_override=a=1,b=2` names (experiment.py: default_hparams) → our keys.
HPARAM_KEYS = {
    "learning_rate": "train.lr",
    "decay_rate": "train.lr_decay_rate",
    "decay_steps": "train.lr_decay_steps",
    "routing": "model.routing_iters",
    "num_prime_capsules": "model.num_prime_capsules",
    "padding": "model.padding",
    "leaky": "model.leaky_routing",
    "remake": "model.reconstruction",
    "loss_type": "loss.name",
}


def valid_keys(node: DictConfig | None = None, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted (e.g. `model.routing_iters`)."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for name in node:
        value = node[name]
        dotted = f"{prefix}{name}"
        keys.extend(valid_keys(value, dotted + ".") if isinstance(value, DictConfig) else [dotted])
    return keys


def _check_keys(keys: Iterable[str], source: str) -> None:
    known = valid_keys()
    sections = {k.split(".")[0] for k in known if "." in k}
    for key in keys:
        if key in known or key in sections:
            continue
        # Match the whole dotted key, then its last part (`routing_iter` → model.routing_iters).
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if not hint:
            leaves = {k.rsplit(".", 1)[-1]: k for k in known}
            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)
            hint = [leaves[close[0]]] if close else []
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"unknown config key '{key}' in {source}{suggestion}")


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        is_section = isinstance(value, DictConfig) and dotted in {
            k.rsplit(".", 1)[0] for k in valid_keys()
        }
        keys.extend(_leaf_keys(value, dotted + ".") if is_section else [dotted])
    return keys


def parse_hparams_override(text: str) -> list[str]:
    """Map the reference's `a=1,b=2` hparams string onto `section.key=value` overrides."""
    overrides = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in HPARAM_KEYS:
            known = ", ".join(sorted(HPARAM_KEYS))
            raise ConfigError(f"--hparams_override: cannot map '{item}' (known names: {known})")
        overrides.append(f"{HPARAM_KEYS[name]}={value}")
    return overrides


def load_config(
    yaml_paths: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()
) -> Config:
    """Build the typed config: schema defaults < each YAML in order < `key=value` overrides."""
    merged = OmegaConf.structured(Config)
    try:
        for path in yaml_paths:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            preset = OmegaConf.load(path)
            if not isinstance(preset, DictConfig):
                raise ConfigError(f"{path}: a config file must hold a mapping of sections")
            _check_keys(_leaf_keys(preset), str(path))
            merged = OmegaConf.merge(merged, preset)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
        dotlist = OmegaConf.from_dotlist(list(overrides))
        _check_keys(_leaf_keys(dotlist), "the command-line overrides")
        merged = OmegaConf.merge(merged, dotlist)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {err.msg if hasattr(err, 'msg') else err}") from err
    if not config.run.dir:
        stem = Path(yaml_paths[0]).stem if yaml_paths else "default"
        config.run.dir = str(Path("runs") / stem)
    return config


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


# `capsdist keys`: each field's docstring is the string literal right below it in schema.py.
def _class_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and is_doc and isinstance(node.target, ast.Name):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, tuple[object, str]]:
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
