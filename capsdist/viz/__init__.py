"""Figures that explain what a capsule network learned (matplotlib, saved as PNG, logged to W&B).

`draw.py` computes them from a live model (and is `capsdist viz` and the training callback);
`figures.py` draws arrays.
"""

from capsdist.viz.draw import FigureCallback, draw_figures, run_viz

__all__ = ["FigureCallback", "draw_figures", "run_viz"]
