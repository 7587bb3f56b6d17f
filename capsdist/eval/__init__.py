"""Reading a run directory's exported weights: evaluate, validate while training, ensembles."""

from capsdist.eval.ensemble import run_ensemble_eval
from capsdist.eval.evaluate import build_eval_reader, evaluate, load_model, run_eval
from capsdist.eval.validate import run_validate

__all__ = [
    "build_eval_reader",
    "evaluate",
    "load_model",
    "run_ensemble_eval",
    "run_eval",
    "run_validate",
]
