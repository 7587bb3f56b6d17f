"""Evaluation of exported models (and, later, validation while training and ensembles)."""

from capsdist.eval.evaluate import evaluate, load_model, resolve_weights, run_eval

__all__ = ["evaluate", "load_model", "resolve_weights", "run_eval"]
