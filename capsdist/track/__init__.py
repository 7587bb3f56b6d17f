"""Metric sinks: console progress bar, W&B, metrics.jsonl."""

from capsdist.track.sinks import JsonlSink, MetricSink, ProgressBar, WandbSink

__all__ = ["JsonlSink", "MetricSink", "ProgressBar", "WandbSink"]
