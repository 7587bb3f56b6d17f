"""Load a typed `Config` from YAML presets and `key=value` overrides; list every key's docs.

Unknown keys are errors that name the closest valid key, wherever they come from (a YAML file or
the command line). OmegaConf does the merging and type checks; the dataclasses' `__post_init__`
does the range and cross-field rules.

Values given as interpolations (`${oc.env:WANDB_API_KEY}`, `${data.root}/extra`) are resolved in
the running config but logged and saved as written (`config_to_dict`, `config_to_yaml`): the
environment may hold secrets, which must not reach W&B or config.yaml, even through another key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
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

# The attribute of a loaded Config that holds its interpolated values as written (dotted key →
# text, or list of texts); set by load_config, read by config_to_dict.
AS_WRITTEN = "_as_written"


def valid_keys(node: DictConfig | None = None, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted (e.g. `model.routing_iters`). A free-form mapping
    (`ds.extra`, whose keys DeepSpeed checks) is one leaf."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for name in node:
        value = node[name]
        dotted = f"{prefix}{name}"
        section = isinstance(value, DictConfig) and OmegaConf.get_type(value) not in (dict, None)
        keys.extend(valid_keys(value, dotted + ".") if section else [dotted])
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
    # Unresolved: an interpolation may name a key of another source (`${wandb.project}`).
    for name, value in node.items_ex(resolve=False):
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
            preset = _load_yaml(path)
            if not isinstance(preset, DictConfig):
                raise ConfigError(f"{path}: a config file must hold a mapping of sections")
            _check_keys(_leaf_keys(preset), str(path))
            merged = OmegaConf.merge(merged, preset)
        dotlist = _parse_overrides(overrides)
        _check_keys(_leaf_keys(dotlist), "the command-line overrides")
        merged = OmegaConf.merge(merged, dotlist)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        # The first line: the rest repeats the key and names OmegaConf's internal types.
        raise ConfigError(f"config key '{key}': {str(err).splitlines()[0]}") from err
    setattr(config, AS_WRITTEN, dict(_interpolations(OmegaConf.to_container(merged))))
    if not config.run.dir:
        stem = Path(yaml_paths[0]).stem if yaml_paths else "default"
        config.run.dir = str(Path("runs") / stem)
    return config


def _load_yaml(path: str | os.PathLike) -> DictConfig | ListConfig:
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML, {_yaml_problem(err)}; fix the file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it as YAML ({err})") from err


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """`key=value` items, each value read as YAML (as OmegaConf's from_dotlist does), one at a
    time so that an error names its item."""
    dotlist = OmegaConf.create()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            dotlist.merge_with_dotlist([item])
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override '{item}': the value is not valid YAML, {_yaml_problem(err)}; quote it"
            ) from err
    return dotlist


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what, on one line (PyYAML's own message spans several)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def _interpolations(node: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value as written) of every value that is or holds an interpolation, in an
    unresolved container."""
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _interpolations(value, dotted + ".")
            continue
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "${" in text for text in texts):
            yield dotted, value


def config_to_dict(config: Config) -> dict:
    """The config as a nested dict for logging (W&B): interpolated values as written."""
    out = asdict(config)
    for dotted, written in getattr(config, AS_WRITTEN, {}).items():
        *sections, name = dotted.split(".")
        node = out
        for section in sections:
            node = node[section]
        node[name] = written
    return out


def config_to_yaml(config: Config) -> str:
    """The config as YAML (config.yaml, the weights' metadata, the printed config):
    interpolated values as written, so it loads back into the same config."""
    return OmegaConf.to_yaml(config_to_dict(config))


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
