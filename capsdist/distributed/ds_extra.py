"""`ds.extra`: DeepSpeed settings capsdist has no key for (bucket sizes, overlap, communication
dtype, profilers, ...), merged into the DeepSpeed config it generates and checked by DeepSpeed's
own config classes before anything starts, so that a typo fails in the first second rather than
being ignored (DeepSpeed skips top-level keys it does not know) or failing at the first step.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import KeysView
from typing import Any

from capsdist.config.schema import ConfigError

# DeepSpeed keys that capsdist sets from keys of its own: the value would be overridden, or
# would disagree with what the rest of capsdist (batch layout, checkpoints, bench) assumes.
OWNED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.micro_batch_size (accumulation = batch / ranks / micro)",
    "bf16.enabled": "ds.precision",
    "fp16.enabled": "ds.precision",
    "torch_autocast": "ds.precision",
    "zero_optimization.stage": "ds.zero_stage",
    "gradient_clipping": "ds.gradient_clipping",
    "optimizer": "train.lr (capsdist passes the reference's Adam to DeepSpeed)",
    "scheduler": "train.lr_decay_rate / lr_decay_steps / lr_min",
    "zero_allow_untested_optimizer": "none: capsdist sets it (its Adam is a client optimizer)",
}


def merge_extra(generated: dict, extra: dict[str, Any]) -> dict:
    """`generated` (from build_deepspeed_config) with `extra` merged in, section by section,
    after refusing owned keys and checking the result with DeepSpeed's config classes."""
    _refuse_owned(extra)
    merged = _deep_merge(generated, extra)
    check_with_deepspeed(merged, extra)
    return merged


def _refuse_owned(extra: dict[str, Any]) -> None:
    for dotted, ours in OWNED.items():
        section, _, key = dotted.partition(".")
        node = extra.get(section)
        present = (isinstance(node, dict) and key in node) if key else section in extra
        if present:
            raise ConfigError(
                f"ds.extra.{dotted} is set by capsdist from its own key: use {ours} instead"
            )


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _ReadTracker(dict):
    """A dict that records which of its keys are looked up (DeepSpeed reads its top-level
    config with `get`, `[]` and `in`); copies share the record."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["looked_up"] = set()

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.looked_up.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.looked_up.add(key)
        return super().__contains__(key)

    def keys(self):
        return KeysView(self)  # its `in` goes through __contains__

    # Iterating is not reading: copy.copy, which DeepSpeedConfig applies first, iterates all.


def check_with_deepspeed(merged: dict, extra: dict[str, Any]) -> None:
    """Build DeepSpeed's own DeepSpeedConfig from `merged` (its pydantic sections refuse unknown
    or mistyped keys) and refuse any top-level key of `extra` that DeepSpeed never read. Call it
    after `engine.import_deepspeed` (which picks DeepSpeed's CPU accelerator when there is no
    GPU)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig checks the batch sizes against the world size it finds (1 when there is
    # no process group yet): validate with a one-rank layout of the same micro-batch.
    one_rank = dict(merged)
    micro, accumulation = (
        merged["train_micro_batch_size_per_gpu"],
        merged["gradient_accumulation_steps"],
    )
    one_rank["train_batch_size"] = micro * accumulation
    tracked = _ReadTracker(one_rank)
    try:
        DeepSpeedConfig(tracked)
    except Exception as err:  # DeepSpeed raises pydantic, assertion and its own errors here
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ConfigError(f"DeepSpeed refused ds.extra={extra}: {detail}") from err
    unread = sorted(set(extra) - tracked.looked_up)
    if unread:
        known = sorted(k for k in tracked.looked_up if isinstance(k, str))
        hints = [difflib.get_close_matches(k, known, n=1, cutoff=0.6) for k in unread]
        named = ", ".join(
            f"'{k}'" + (f" (did you mean '{h[0]}'?)" if h else "")
            for k, h in zip(unread, hints, strict=True)
        )
        raise ConfigError(
            f"ds.extra: DeepSpeed {_deepspeed_version()} has no setting {named}; see "
            "https://www.deepspeed.ai/docs/config-json/"
        )


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
