"""`capsdist export`: the trained model as an ONNX graph or a torch.export program (`.pt2`),
checked against eager evaluation before it is kept.

The graph takes `images` (N, C, H, W) float32 in [0, 1] at the model's input size, N dynamic,
and returns `lengths` (N, classes) and, when the model has a decoder, `reconstruction` ((N, C, H,
W), or (N, 2, C, H, W) for two targets, masked by the predicted classes). The data set's
per-image standardisation (CIFAR-10, smallNORB) is inside the graph; resizing and cropping to
the input size are not (`capsdist predict` does them; docs/after_training.md).

Routing is traced on torch ops whatever model.fused_routing says (model.portable). Parity: the
exported file, loaded back and run by onnxruntime or torch, against the eager model as `capsdist
eval` runs it (configured routing, the reader's own evaluation transform) on the first images of
data.root's evaluation split, or on random images when data.root cannot be read. A difference
above the tolerance fails the command and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from capsdist.config import Config, ConfigError
from capsdist.data import build_augmentation
from capsdist.errors import UserError
from capsdist.eval import load_model
from capsdist.models import ModelOutput
from capsdist.serve.inputs import Conversion, Item, first_images
from capsdist.serve.model import ServingModel, build_serving_model, data_image_shape, portable

FORMATS = ("onnx", "pt2")
MIN_OPSET = 17  # LayerNormalization and the exporter's decompositions need 17 or later
DEFAULT_OPSET = 18
TOLERANCE = 1e-4


class ExportError(UserError, RuntimeError):
    """The model could not be exported, or the exported file does not match eager evaluation."""


def run_export(
    cfg: Config,
    weights: Path,
    fmt: str = "",
    out: str = "",
    opset: int = DEFAULT_OPSET,
    num_examples: int = 64,
) -> dict:
    """Export cfg's model from `weights` to `out` (default: beside the weights), check parity,
    return the JSON result (with `error` when parity fails)."""
    fmt = fmt or (Path(out).suffix.lstrip(".") if Path(out).suffix in (".onnx", ".pt2") else "onnx")
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be onnx or pt2, got {fmt!r}")
    if fmt == "onnx" and opset < MIN_OPSET:
        raise ConfigError(f"--opset must be >= {MIN_OPSET}, got {opset}")
    if num_examples < 1:
        raise ConfigError(f"--parity-examples must be >= 1, got {num_examples}")
    path = Path(out) if out else weights.with_suffix(f".{fmt}")
    cpu = torch.device("cpu")
    eager = load_model(weights, cfg, cpu)  # as `capsdist eval` runs it
    traced = build_serving_model(weights, portable(cfg), cpu)
    pixels, source = parity_images(cfg, num_examples)
    images = _to_model_input(pixels, cfg)  # (N, C, h, w) in [0, 1]: the graph's input
    reference = _eager_reference(eager, pixels, cfg)

    # torch.export.load wants a name ending in .pt2 (else a slow fallback), onnx does not care.
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "onnx":
            _export_onnx(traced, images, tmp, opset)
            outputs, single = _run_onnx(tmp, images)
        else:
            _export_pt2(traced, images, tmp)
            outputs, single = _run_pt2(tmp, images)
        diff = max(_max_diff(outputs, reference), _max_diff(single, [r[:1] for r in reference]))
        preds = _predictions(outputs[0], cfg), _predictions(reference[0], cfg)
        agree = int((preds[0] == preds[1]).all(1).sum())
        if diff <= TOLERANCE and math.isfinite(diff):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    result = {
        "format": fmt,
        "out": str(path),
        "checkpoint": str(weights),
        "max_abs_diff": diff,
        "tolerance": TOLERANCE,
        "parity_examples": len(images),
        "parity_images": source,
        "classes_agree": f"{agree}/{len(images)}",
        "input": {"name": "images", "shape": ["N", *images.shape[1:]], "range": [0.0, 1.0]},
        "outputs": traced.output_names(),
        "standardize_in_graph": cfg.data.standardize,
        **({"opset": opset} if fmt == "onnx" else {}),
    }
    if not diff <= TOLERANCE:
        result["error"] = (
            f"parity check failed: the exported {fmt} model differs from eager evaluation by "
            f"{diff:.3g} > {TOLERANCE:g}; {path} was not written"
        )
    return result


# ---- test images and the eager reference --------------------------------------------------------


def parity_images(cfg: Config, n: int) -> tuple[np.ndarray, str]:
    """uint8 (N, H, W, C) at the data set's size, and where they came from: the first n of
    data.root's evaluation split, or (data.root unset / unreadable) n random images."""
    data_shape, meta = data_image_shape(cfg, warn=False)
    usable = Conversion.of(cfg.model.image_shape, data_shape, False).data_shape == tuple(data_shape)
    if meta is not None and usable:
        split = cfg.data.eval_split
        pixels = first_images(cfg.data.root, meta, split, n)
        return pixels, f"the first {len(pixels)} of {cfg.data.root} split {split}"
    why = "does not fit the model" if meta is not None else "is not set or not readable here"
    print(
        f"note: data.root {why}: checking parity on random images (set data.root=DIR to "
        "check on the data set's own images)",
        file=sys.stderr,
    )
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *cfg.model.image_shape), dtype=np.uint8), "random"


def _to_model_input(pixels: np.ndarray, cfg: Config) -> torch.Tensor:
    """What `capsdist predict` feeds the graph: cut to the model's size (Conversion), / 255."""
    convert = Conversion.of(cfg.model.image_shape, list(pixels.shape[1:]), invert=False)
    cut = np.stack([convert(Item("", p, from_shards=True))[0] for p in pixels])
    return torch.from_numpy(cut).permute(0, 3, 1, 2).to(torch.float32).div(255).contiguous()


@torch.no_grad()
def _eager_reference(model: torch.nn.Module, pixels: np.ndarray, cfg: Config) -> list[torch.Tensor]:
    """The eager model's outputs on the images transformed by the reader's own evaluation step
    (build_augmentation: centre crop, / 255, standardisation), so parity covers the conversion
    outside the graph and the standardisation inside it too."""
    augment = build_augmentation(cfg, list(pixels.shape[1:]))
    images, _ = augment(torch.from_numpy(pixels), None, train=False)
    out = model(images)
    return [out.lengths] if out.reconstruction is None else [out.lengths, out.reconstruction]


def _predictions(lengths: torch.Tensor, cfg: Config) -> torch.Tensor:
    return ModelOutput(lengths=lengths).predictions(cfg.model.num_targets).view(len(lengths), -1)


def _max_diff(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    if len(outputs) != len(reference):
        return math.inf
    diffs = [(a.float() - b.float()).abs().max() for a, b in zip(outputs, reference, strict=True)]
    return float(torch.stack(diffs).max())


# ---- the two formats ----------------------------------------------------------------------------


def _dynamic_batch() -> dict:
    return {"images": {0: torch.export.Dim("batch", min=1)}}


def _example(images: torch.Tensor) -> torch.Tensor:
    """Two images to trace with: a batch of 1 would be specialised to the constant 1."""
    return torch.cat([images, images])[:2]


@contextlib.contextmanager
def _quiet():
    """The exporters print progress to stdout, which holds only capsdist's JSON lines, and log
    warnings about optional packages (torchvision) this model does not use."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export_onnx(model: ServingModel, images: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as err:
        raise ExportError(
            f"--format onnx needs onnx, onnxscript and onnxruntime ({err}): "
            "pip install 'capsdist[export]'"
        ) from err
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (_example(images),),
            str(path),
            input_names=["images"],
            output_names=model.output_names(),
            opset_version=opset,
            dynamic_shapes=_dynamic_batch(),
            external_data=False,  # one self-contained file (models here are far below 2 GB)
            dynamo=True,
            verbose=False,
        )


def _run_onnx(path: Path, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The graph run by onnxruntime on the whole batch and on its first image alone (dynamic
    batch, 1 included)."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportError(
            f"the ONNX parity check needs onnxruntime ({err}): pip install 'capsdist[export]'"
        ) from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in session.run(None, {"images": batch.numpy()})]

    return run(images), run(images[:1])


def _export_pt2(model: ServingModel, images: torch.Tensor, path: Path) -> None:
    with _quiet(), torch.no_grad():
        program = torch.export.export(model, (_example(images),), dynamic_shapes=_dynamic_batch())
        torch.export.save(program, str(path))


def _run_pt2(path: Path, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    module = torch.export.load(str(path)).module()

    def run(batch: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            out = module(batch)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run(images), run(images[:1])
