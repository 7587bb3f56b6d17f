"""Figures that explain what a capsule network learned (matplotlib, saved as PNG, logged to W&B).

`draw.py` computes them from a live model, `figures.py` draws arrays, `callback.py` draws them at
every evaluation of a training run, `command.py` is `capsdist viz`.
"""
