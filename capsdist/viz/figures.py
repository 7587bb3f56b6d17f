"""Drawing: numpy arrays in, PNG files out (matplotlib, Agg backend: no display needed).

Images are (N, H, W, C) float in [0, 1]; one channel is drawn in grey. Every function returns
the path it wrote.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _show(ax, image_hwc: np.ndarray) -> None:
    ax.imshow(
        image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc, cmap="gray", vmin=0, vmax=1
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def reconstructions(
    inputs: np.ndarray, recons: np.ndarray, labels: list[str], preds: list[str], path: Path
) -> Path:
    """Inputs (top row) above their reconstructions (bottom row), as the paper's Figure 3."""
    n = len(inputs)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8), squeeze=False)
    for i in range(n):
        _show(axes[0, i], inputs[i])
        axes[0, i].set_title(f"label {labels[i]}", fontsize=7)
        _show(axes[1, i], recons[i])
        axes[1, i].set_title(f"pred {preds[i]}", fontsize=7)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("reconstruction")
    return _save(fig, path)


def perturbation_grid(grid: np.ndarray, deltas: np.ndarray, title: str, path: Path) -> Path:
    """grid (D, S, H, W, C): row d = dimension d of the class capsule moved by deltas[s]
    (the paper's Figure 4)."""
    dims, steps = grid.shape[:2]
    fig, axes = plt.subplots(dims, steps, figsize=(0.7 * steps, 0.7 * dims), squeeze=False)
    for d in range(dims):
        for s in range(steps):
            _show(axes[d, s], grid[d, s])
            if d == 0:
                axes[d, s].set_title(f"{deltas[s]:+.2f}", fontsize=6)
        axes[d, 0].set_ylabel(f"dim {d}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def confusion_matrix(matrix: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    """matrix (J, J): counts, rows = true class, columns = predicted class."""
    j = len(class_names)
    fig, ax = plt.subplots(figsize=(0.45 * j + 2, 0.45 * j + 1.5))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(j), class_names, fontsize=7)
    ax.set_yticks(range(j), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for r in range(j):
        for c in range(j):
            if matrix[r, c]:
                color = "white" if matrix[r, c] > matrix.max() / 2 else "black"
                ax.text(
                    c, r, str(int(matrix[r, c])), ha="center", va="center", fontsize=6, color=color
                )
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def routing(
    image: np.ndarray, coupling_ij: np.ndarray, lengths_j: np.ndarray, title: str, path: Path
) -> Path:
    """One example: the input, its coupling coefficients (I input capsules × J classes) and
    the class capsule lengths."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), width_ratios=[1, 3, 2], layout="constrained")
    _show(axes[0], image)
    axes[0].set_title("input", fontsize=8)
    im = axes[1].imshow(coupling_ij.T, aspect="auto", cmap="viridis", interpolation="nearest")
    axes[1].set_xlabel("input (primary) capsule i")
    axes[1].set_ylabel("class j")
    axes[1].set_title("coupling coefficients c_ij (last iteration)", fontsize=8)
    fig.colorbar(im, ax=axes[1])
    classes = np.arange(len(lengths_j))
    axes[2].bar(classes, lengths_j, color="tab:blue", label="capsule length")
    axes[2].bar(classes, coupling_ij.mean(0), width=0.4, color="tab:orange", label="mean c_ij")
    axes[2].set_xticks(classes)
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def two_colour(
    inputs: np.ndarray, recons: np.ndarray, preds: list[tuple[int, int]], path: Path
) -> Path:
    """MultiMNIST: each of the two reconstructed digits in its own colour (red, green) over the
    input in grey, as the paper's Figure 5. inputs (N, H, W, 1), recons (N, 2, H, W, 1)."""
    n = len(inputs)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.9), squeeze=False)
    for i in range(n):
        _show(axes[0, i], inputs[i])
        grey = inputs[i][..., 0] * 0.35
        rgb = np.stack([grey, grey, grey], axis=-1)
        rgb[..., 0] = np.maximum(rgb[..., 0], recons[i, 0, ..., 0])
        rgb[..., 1] = np.maximum(rgb[..., 1], recons[i, 1, ..., 0])
        _show(axes[1, i], np.clip(rgb, 0, 1))
        axes[1, i].set_title(f"R {preds[i][0]}  G {preds[i][1]}", fontsize=7)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("R/G digits")
    return _save(fig, path)
