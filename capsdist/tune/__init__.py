"""Ray Tune sweeps: every trial runs the same training loop with config overrides.

The only package that imports Ray (sweep.py, trial.py); the CLI imports them only to run a sweep,
so `capsdist --help` stays fast.
"""

from capsdist.tune.spec import SweepConfig, SweepError, SweepSpec, load_sweep

__all__ = ["SweepConfig", "SweepError", "SweepSpec", "load_sweep"]
