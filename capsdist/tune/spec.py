"""A sweep file: which training configs, the search space over their keys, and how to run it.

```yaml
sweep:      # how to run (SweepConfig below)
  configs: [configs/debug_cpu.yaml]
  scheduler: asha
space:      # config key → one of {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]},
  model.routing_iters: {grid: [1, 3]}              #   {loguniform: [lo, hi]}
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
overrides:  # fixed config keys for every trial
  train.eval_every: 10
```
Every space key is checked against the training schema before Ray starts, with every grid or
choice value (and both ends of a range), so a typo fails in a second, not in trial 7.
No Ray here: the spec is plain data; capsdist/tune/sweep.py turns it into a Ray Tune search space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capsdist.config import Config, ConfigError, load_config
from capsdist.errors import UserError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")


class SweepError(UserError, ValueError):
    """A sweep file is invalid; the message names the file and the key."""


@dataclass
class SweepConfig:
    name: str = ""
    """Sweep name: W&B group and default directory; empty = the sweep file's name."""
    configs: list[str] = field(default_factory=list)
    """Training config presets every trial starts from (in order, later files win)."""
    metric: str = "eval_accuracy"
    """Metric the scheduler and the best-trial choice use (reported after every log line)."""
    mode: str = "max"
    """`max` or `min`: whether a larger `metric` is better."""
    scheduler: str = "fifo"
    """`fifo` (every trial runs to train.max_steps) or `asha` (stops weak trials early)."""
    asha_grace_period: int = 1
    """ASHA: reports (log lines) a trial makes before it can be stopped."""
    asha_reduction_factor: int = 2
    """ASHA: keep the top 1/factor of trials at each rung."""
    num_samples: int = 1
    """Samples of the space: repeats of the whole grid; draws of the random parts."""
    cpus_per_trial: float = 1.0
    """CPUs Ray reserves per trial, per worker if workers_per_trial > 1 (fractional allowed:
    0.5 runs two trials on one core)."""
    gpus_per_trial: float = 0.0
    """GPUs Ray reserves per trial, per worker if workers_per_trial > 1 (fractional allowed:
    0.5 shares one GPU between two trials)."""
    workers_per_trial: int = 1
    """Ray Train workers per trial, training data parallel (DeepSpeed across them, gloo on CPU,
    NCCL on GPU); 1 = each trial trains in its own Tune process."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0 = as many as the resources allow."""
    ray_num_cpus: int = 0
    """CPUs of the local Ray instance; 0 = all of the machine's (ignored with ray_address)."""
    ray_address: str = ""
    """Connect to this Ray cluster (e.g. `auto`) instead of starting a local instance."""
    dir: str = ""
    """Sweep directory (Ray state, trial runs, results); empty = runs/sweeps/<name>."""
    figures: bool = False
    """Draw figures (capsdist.viz) into each trial's run.dir/figures at every evaluation."""
    time_budget_s: float = 0.0
    """Stop starting/continuing trials after this many seconds; 0 = no budget."""

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise SweepError(f"sweep.mode must be max or min, got {self.mode!r}")
        if self.scheduler not in ("fifo", "asha"):
            raise SweepError(f"sweep.scheduler must be fifo or asha, got {self.scheduler!r}")
        if (
            self.num_samples < 1
            or self.cpus_per_trial <= 0
            or self.gpus_per_trial < 0
            or self.workers_per_trial < 1
        ):
            raise SweepError(
                "sweep.num_samples must be >= 1, sweep.cpus_per_trial > 0, "
                "sweep.gpus_per_trial >= 0, sweep.workers_per_trial >= 1"
            )


@dataclass
class Dimension:
    """One axis of the search space: a config key and how its values are drawn."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    values: list  # grid/choice: the values; uniform/loguniform: [low, high]

    def probe_values(self) -> list:
        """Values to check against the schema: all listed values, or both ends of a range."""
        return list(self.values)


@dataclass
class SweepSpec:
    path: Path
    sweep: SweepConfig
    space: list[Dimension]
    overrides: list[str]
    """Fixed `key=value` config overrides for every trial (file first, then command line)."""

    @property
    def dir(self) -> Path:
        return Path(self.sweep.dir or Path("runs") / "sweeps" / self.sweep.name).absolute()

    def num_grid_points(self) -> int:
        count = 1
        for dim in self.space:
            count *= len(dim.values) if dim.kind == "grid" else 1
        return count

    def num_trials(self) -> int:
        """Trials Ray Tune will run: the grid's points × num_samples."""
        return self.num_grid_points() * self.sweep.num_samples

    def base_config(self) -> Config:
        """The training config shared by every trial (before the space's values)."""
        return load_config(self.sweep.configs, self.overrides)


def format_override(key: str, value) -> str:
    """`key=value` that OmegaConf's dotlist parses back to the same value and type."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list):
        text = "[" + ",".join(str(v) for v in value) + "]"
    else:
        text = repr(value)
    return f"{key}={text}"


def _parse_dimension(path: Path, key: str, node) -> Dimension:
    example = f"e.g. {key}: {{grid: [1, 3]}} or {{loguniform: [1.0e-4, 1.0e-2]}}"
    if not isinstance(node, DictConfig) or len(node) != 1:
        raise SweepError(
            f"{path}: space key '{key}' needs exactly one of {DISTRIBUTIONS}, {example}"
        )
    kind = str(next(iter(node.keys())))
    values = node[kind]
    if kind not in DISTRIBUTIONS:
        raise SweepError(
            f"{path}: space key '{key}': unknown distribution '{kind}'; use {DISTRIBUTIONS}"
        )
    if not isinstance(values, ListConfig) or not values:
        raise SweepError(f"{path}: space key '{key}': {kind} needs a non-empty list, {example}")
    values = OmegaConf.to_container(values)
    if kind in ("uniform", "loguniform"):
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numeric or not values[0] < values[1]:
            raise SweepError(f"{path}: space key '{key}': {kind} needs [low, high] with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise SweepError(f"{path}: space key '{key}': loguniform needs low > 0")
    return Dimension(key, kind, values)


def load_sweep(path: str | Path, cli_overrides: list[str] = ()) -> SweepSpec:
    """Read and check a sweep file. `sweep.x=v` overrides go to the sweep settings, any other
    `key=v` to every trial's training config (after the file's own `overrides`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.load(path)
        unknown = set(raw.keys()) - {"sweep", "space", "overrides"}
        if unknown:
            raise SweepError(
                f"{path}: unknown top-level key(s) {sorted(unknown)}; use sweep, space, overrides"
            )
        sweep_node = OmegaConf.merge(OmegaConf.structured(SweepConfig), raw.get("sweep", {}))
        sweep_cli = [o.removeprefix("sweep.") for o in cli_overrides if o.startswith("sweep.")]
        sweep_node = OmegaConf.merge(sweep_node, OmegaConf.from_dotlist(sweep_cli))
        sweep = OmegaConf.to_object(sweep_node)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise SweepError(f"{path}: sweep key '{key}': {getattr(err, 'msg', err)}") from err
    sweep.name = sweep.name or path.stem
    if not sweep.configs:
        raise SweepError(f"{path}: sweep.configs is empty: name the training config(s) to sweep")
    fixed = raw.get("overrides") or {}
    overrides = [format_override(k, v) for k, v in OmegaConf.to_container(fixed).items()]
    overrides += [o for o in cli_overrides if not o.startswith("sweep.")]
    space_node = raw.get("space") or {}
    space = [_parse_dimension(path, str(k), v) for k, v in space_node.items()]
    if not space:
        raise SweepError(
            f"{path}: the search space is empty: add a `space:` entry such as "
            "model.routing_iters: {grid: [1, 3]}"
        )
    spec = SweepSpec(path, sweep, space, overrides)
    check_spec(spec)
    return spec


def check_spec(spec: SweepSpec) -> None:
    """Every space key and value must make a valid training config; the metric must exist."""
    try:
        base = spec.base_config()
    except ConfigError as err:
        raise SweepError(f"{spec.path}: {err}") from err
    for dim in spec.space:
        for value in dim.probe_values():
            try:
                load_config(spec.sweep.configs, [*spec.overrides, format_override(dim.key, value)])
            except ConfigError as err:
                raise SweepError(f"{spec.path}: space key '{dim.key}' = {value!r}: {err}") from err
    if spec.sweep.metric.startswith("eval_") and base.train.eval_every == 0:
        raise SweepError(
            f"{spec.path}: sweep.metric={spec.sweep.metric} needs train.eval_every > 0 "
            "(set it under `overrides:`), or use sweep.metric=train_accuracy"
        )
