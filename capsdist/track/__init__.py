"""Metric sinks: console progress bar, W&B, metrics.jsonl."""

from capsdist.track.sinks import (
    JsonlSink,
    MetricSink,
    ProgressBar,
    WandbSink,
    build_wandb_sink,
    log_images,
    log_model_artifact,
    model_artifact_name,
)

__all__ = [
    "JsonlSink",
    "MetricSink",
    "ProgressBar",
    "WandbSink",
    "build_wandb_sink",
    "log_images",
    "log_model_artifact",
    "model_artifact_name",
]
