"""Every figure is written as a valid, non-blank PNG, from real data and a real (tiny) CapsNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from capsdist.config import load_config
from capsdist.data import read_meta
from capsdist.eval import build_eval_reader
from capsdist.models import build_model
from capsdist.viz import figures
from capsdist.viz.draw import DELTAS, FigureCallback, draw_figures, perturbed_reconstructions
from data_tools.synthetic import make_synthetic_shards

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = imread(path)  # (H, W, 4) floats: decodes only if the file is a whole PNG
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 50
    assert pixels[..., :3].std() > 0.02, f"{path} is blank"


def _model_and_reader(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return model, build_eval_reader(cfg, read_meta(cfg.data.root), torch.device("cpu"))


@pytest.mark.slow
def test_mnist_figures_are_valid_pngs(mnist_sample, tmp_path):
    cfg = load_config(
        ["configs/debug_cpu.yaml"], [f"data.root={mnist_sample}", "eval.max_examples=200"]
    )
    model, reader = _model_and_reader(cfg)
    batch = next(iter(reader.epoch(0)))
    model.train()
    paths = draw_figures(
        model, batch.images, tmp_path, labels=batch.labels, num_targets=1, reader=reader
    )
    assert set(paths) == {"reconstructions", "perturbations", "routing", "confusion"}
    for path in paths.values():
        assert path.parent == tmp_path
        assert_valid_png(path)
    assert model.training  # restored after drawing in eval mode


def test_perturbation_grid_moves_one_dimension_per_row():
    cfg = load_config(["configs/debug_cpu.yaml"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    out = model(torch.rand(1, 1, 28, 28))
    grid = perturbed_reconstructions(model, out.poses[0], target=3)  # (D, S, C, H, W)
    assert grid.shape == (16, 11, 1, 28, 28) and len(DELTAS) == 11
    assert DELTAS[0] == -0.25 and DELTAS[-1] == 0.25 and DELTAS[5] == 0.0
    unperturbed = model.decoder(out.poses, torch.tensor([[3]]))[0, 0]
    for d in range(16):  # the zero column is the plain reconstruction in every row
        torch.testing.assert_close(grid[d, 5], unperturbed)
    assert not torch.allclose(grid[0, 0], grid[0, -1])  # moving a dimension changes the image


@pytest.mark.slow
def test_multimnist_two_colour_figure(tmp_path):
    make_synthetic_shards(
        tmp_path / "data", n_train=64, n_test=32, image_shape=(36, 36, 1), num_targets=2
    )
    cfg = load_config(
        ["configs/debug_cpu.yaml"],
        [f"data.root={tmp_path / 'data'}", "model.image_shape=[36,36,1]", "model.num_targets=2"],
    )
    model, reader = _model_and_reader(cfg)
    batch = next(iter(reader.epoch(0)))
    paths = draw_figures(
        model, batch.images, tmp_path / "fig", labels=batch.labels, num_targets=2, reader=reader
    )
    assert {"multimnist", "perturbations", "routing", "confusion"} <= set(paths)
    for path in paths.values():
        assert_valid_png(path)


def test_two_colour_draws_each_digit_in_its_own_colour(tmp_path):
    inputs = np.zeros((1, 36, 36, 1), dtype=np.float32)
    recons = np.zeros((1, 2, 36, 36, 1), dtype=np.float32)
    recons[0, 0, 4:14, 4:14] = 1.0  # first digit: top left → red
    recons[0, 1, 22:32, 22:32] = 1.0  # second digit: bottom right → green
    inputs[0] = np.maximum(recons[0, 0], recons[0, 1])
    path = figures.two_colour(inputs, recons, [(3, 8)], tmp_path / "two.png")
    assert_valid_png(path)
    rgb = imread(path)[..., :3]
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.5)  # the input shows faintly grey beneath
    green = (rgb[..., 1] > 0.8) & (rgb[..., 0] < 0.5)
    assert red.sum() > 20 and green.sum() > 20
    rows_red, rows_green = np.nonzero(red)[0], np.nonzero(green)[0]
    assert rows_red.mean() < rows_green.mean()  # red digit above the green one, as drawn


@pytest.mark.slow
def test_figure_callback_draws_only_at_evaluations(mnist_sample, tmp_path):
    cfg = load_config(
        ["configs/debug_cpu.yaml"],
        [f"data.root={mnist_sample}", f"run.dir={tmp_path}", "eval.max_examples=100"],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    callback = FigureCallback(cfg, read_meta(cfg.data.root), max_confusion_batches=1)
    callback(10, {"loss": 1.0}, model)
    assert not (tmp_path / "figures").exists()
    callback(20, {"loss": 1.0, "eval_accuracy": 0.5}, model)
    names = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert names == ["confusion.png", "perturbations.png", "reconstructions.png", "routing.png"]


@pytest.mark.parametrize("bad", ["model.name=baseline"])
def test_figures_that_do_not_apply_are_skipped(mnist_sample, tmp_path, bad):
    cfg = load_config(
        ["configs/debug_cpu.yaml"],
        [f"data.root={mnist_sample}", bad, "loss.name=softmax", "eval.max_examples=100"],
    )
    model, reader = _model_and_reader(cfg)
    batch = next(iter(reader.epoch(0)))
    paths = draw_figures(
        model, batch.images, tmp_path, labels=batch.labels, num_targets=1, reader=reader
    )
    assert set(paths) == {"confusion"}  # a CNN has no capsules, routing or decoder
    assert_valid_png(paths["confusion"])
