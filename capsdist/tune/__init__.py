"""Ray Tune sweeps: every trial runs the same training loop with config overrides.

The only package that imports Ray (lazily, inside functions: `capsdist --help` stays fast).
"""

from capsdist.tune.spec import SweepConfig, SweepError, SweepSpec, load_sweep

__all__ = ["SweepConfig", "SweepError", "SweepSpec", "load_sweep"]
