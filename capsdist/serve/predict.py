"""`capsdist predict`: classify image files, .npy arrays, folders or shard sets with exported
weights; one JSON line per input on stdout, in input order, then the summary line.

    {"path": "digits/7.png", "class": 7, "confidence": 0.93, "lengths": [0.01, ..., 0.93, ...]}
    {"path": "notes.png", "error": "not an image file (PNG, JPEG, ...) nor a .npy array"}
    {"num_predicted": 199, "num_failed": 1, ...}

Two-target models (MultiMNIST) give `class` and `confidence` as lists of two (the two longest
capsules, ascending class). Inputs are converted as the model's data set was (inputs.py) and run
in batches of eval.batch_size through the very module `capsdist export` writes out (model.py).
An input that cannot be read gets a line with `error`; the others are still predicted, and the
command exits non-zero at the end.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from capsdist.config import Config, ConfigError
from capsdist.distributed import pick_device
from capsdist.errors import UserError
from capsdist.models import ModelOutput
from capsdist.serve.inputs import Conversion, Item, count_items, list_sources, read_items
from capsdist.serve.model import build_serving_model, class_scores, data_image_shape
from capsdist.track import ProgressBar

DIGITS = 6  # of the lengths and confidences printed: enough to rank, short lines


def run_predict(
    cfg: Config,
    weights: Path,
    paths: list[str],
    *,
    invert: bool = False,
    recon_dir: str = "",
    batch_size: int = 0,
) -> dict:
    """Predict every input of `paths`; returns the summary (with `error` if any input failed)."""
    if batch_size < 0:
        raise ConfigError(f"--batch-size must be >= 1 (0: eval.batch_size), got {batch_size}")
    device = pick_device()
    model = build_serving_model(weights, cfg, device)
    if recon_dir and not model.has_decoder:
        raise ConfigError(
            f"--recon: {weights} has no decoder (model.reconstruction=false); drop --recon"
        )
    data_shape, _ = data_image_shape(cfg)
    predictor = _Predictor(
        model,
        cfg,
        Conversion.of(cfg.model.image_shape, data_shape, invert),
        Path(recon_dir) if recon_dir else None,
        device,
    )
    sources, notes = list_sources(paths, cfg.data.eval_split)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    total = count_items(sources)
    if total == 0:
        raise UserError(f"no image to predict in {' '.join(paths)}")
    batch_size = batch_size or cfg.eval.batch_size
    bar = ProgressBar(total, desc="predict", unit="image")
    pending: list[tuple[Item, np.ndarray | None]] = []  # in input order, unreadable ones too
    num_good = 0
    try:
        for item in read_items(sources, cfg.data.on_error):
            pixels = predictor.convert(item)
            pending.append((item, pixels))
            num_good += pixels is not None
            if num_good == batch_size:
                bar.update(predictor.flush(pending))
                pending, num_good = [], 0
        bar.update(predictor.flush(pending))
    finally:
        bar.close()
    return predictor.summary(weights)


class _Predictor:
    """Converts inputs, runs batches, prints their lines, writes reconstructions, counts."""

    def __init__(self, model, cfg: Config, convert: Conversion, recon_dir: Path | None, device):
        self.model, self.cfg, self._convert = model, cfg, convert
        self.recon_dir, self.device = recon_dir, device
        self.num_predicted = self.num_failed = self.num_labelled = self.num_correct = 0
        self._warned_sizes: set[tuple[int, int]] = set()

    def convert(self, item: Item) -> np.ndarray | None:
        """The model's uint8 (h, w, C) pixels of an input, or None (with item.error set)."""
        if item.error:
            return None
        try:
            pixels, resized_from = self._convert(item)
        except ValueError as err:  # ImageError: channels that cannot be converted
            item.error = str(err)
            return None
        if resized_from and resized_from not in self._warned_sizes:
            self._warned_sizes.add(resized_from)
            h, w = self._convert.data_shape[:2]
            print(
                f"warning: resizing {resized_from[0]}x{resized_from[1]} images to {h}x{w}, the "
                f"size of the model's data set (first: {item.path}); the aspect ratio and stroke "
                "width change, which costs accuracy",
                file=sys.stderr,
            )
        item.resized_from = resized_from
        return pixels

    @torch.no_grad()
    def flush(self, pending: list[tuple[Item, np.ndarray | None]]) -> int:
        """Run the converted inputs as one batch, print every pending line in input order;
        returns the number of inputs handled."""
        good = [pixels for _, pixels in pending if pixels is not None]
        results = iter(self._run(np.stack(good)) if good else ())
        for item, pixels in pending:
            line = {"path": item.path}
            if pixels is None:
                line["error"] = item.error
                self.num_failed += 1
            else:
                row, recon = next(results)
                line.update(row)
                self._score(item, line)
                if self.recon_dir is not None:
                    line["recon"] = str(self._write_recon(item, pixels, recon))
                self.num_predicted += 1
            if item.resized_from:
                line["resized_from"] = list(item.resized_from)
            print(json.dumps(line), file=sys.stdout)
        sys.stdout.flush()
        return len(pending)

    def _run(self, pixels_bhwc: np.ndarray) -> list[tuple[dict, np.ndarray | None]]:
        """uint8 (B, h, w, C) → per image: (class, confidence, lengths; its reconstruction
        (C, h, w) or (T, C, h, w), None without a decoder)."""
        images = torch.from_numpy(pixels_bhwc).to(self.device).permute(0, 3, 1, 2)
        images = images.to(torch.float32).div_(255)  # (B, C, h, w) in [0, 1], as the reader
        out = self.model(images)
        lengths, recon = (out, None) if isinstance(out, torch.Tensor) else out
        lengths = lengths.float().cpu()  # one copy off the GPU per batch, not one per value
        recon = None if recon is None else recon.float().cpu().numpy()
        targets = self.cfg.model.num_targets
        preds = ModelOutput(lengths=lengths).predictions(targets).view(len(images), -1)  # (B, T)
        scores = class_scores(lengths, self.cfg)
        confidence = scores.gather(1, preds)  # (B, T)
        rows = []
        for b in range(len(images)):
            row = {
                "class": _one_or_list(preds[b].tolist(), targets),
                "confidence": _one_or_list(_rounded(confidence[b]), targets),
                "lengths": _rounded(lengths[b]),
            }
            rows.append((row, None if recon is None else recon[b]))
        return rows

    def _score(self, item: Item, line: dict) -> None:
        if item.label is None:
            return
        line["label"] = _one_or_list(item.label, len(item.label))
        predicted = line["class"] if isinstance(line["class"], list) else [line["class"]]
        self.num_labelled += 1
        self.num_correct += sorted(predicted) == sorted(item.label)

    def _write_recon(self, item: Item, pixels_hwc: np.ndarray, recon: np.ndarray) -> Path:
        """recon_dir/NNNNNN-NAME.png: the input as the model saw it, then its reconstruction(s)
        (one per target), side by side, scaled up to at least 112 pixels high."""
        from PIL import Image

        number = self.num_predicted + self.num_failed
        name = re.sub(r"[^\w.-]+", "_", Path(item.path.split("#")[-1]).stem)[:60]
        path = self.recon_dir / f"{number:06d}-{name}.png"
        recons = recon if recon.ndim == 4 else recon[None]  # (T, C, h, w)
        panels = [pixels_hwc.astype(np.float32) / 255]
        panels += [r.transpose(1, 2, 0) for r in recons]  # (h, w, C) each
        strip = np.concatenate([_displayable(p) for p in panels], axis=1)
        scale = max(1, 112 // strip.shape[0])
        image = Image.fromarray(strip.repeat(scale, 0).repeat(scale, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        return path

    def summary(self, weights: Path) -> dict:
        result = {
            "num_predicted": self.num_predicted,
            "num_failed": self.num_failed,
            "checkpoint": str(weights),
        }
        if self.num_labelled:  # shard sets carry labels: the accuracy over them
            result["num_labelled"] = self.num_labelled
            result["accuracy"] = self.num_correct / self.num_labelled
        if self.num_failed:
            result["error"] = (
                f"{self.num_failed} of {self.num_failed + self.num_predicted} input(s) could not "
                "be predicted (their lines hold `error`)"
            )
        return result


def _displayable(image_hwc: np.ndarray) -> np.ndarray:
    """float (h, w, C) in [0, 1] → uint8 (h, w + gap, 3) with a grey gap on the right; one or
    two channels (stereo) are shown in grey, side by side."""
    channels = image_hwc.shape[2]
    if channels != 3:
        image_hwc = np.concatenate([image_hwc[:, :, c : c + 1] for c in range(channels)], axis=1)
        image_hwc = np.repeat(image_hwc, 3, axis=2)
    pixels = np.rint(np.clip(image_hwc, 0, 1) * 255).astype(np.uint8)
    gap = np.full((pixels.shape[0], 2, 3), 128, dtype=np.uint8)
    return np.concatenate([pixels, gap], axis=1)


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), DIGITS) for v in values]


def _one_or_list(values: list, num_targets: int):
    return values[0] if num_targets == 1 else values
