"""`capsdist bench data data.root=DIR`: samples/s that one reader delivers, decoded and batched.

Reads the training split with the config's augmentation (crop, shift, flips, ...) into float32
batches on the CPU, as the trainer would receive them, for `train.time_limit_s` seconds (5 s when
unset) after one warm-up batch. `data.num_workers=0` (the default) measures one process.
"""

from __future__ import annotations

import time

from capsdist.config import Config
from capsdist.data import build_reader, read_meta
from capsdist.track import ProgressBar

DEFAULT_SECONDS = 5.0


def run(cfg: Config) -> dict:
    """Read batches for a fixed time; returns the throughput and what was measured."""
    seconds = cfg.train.time_limit_s or DEFAULT_SECONDS
    meta = read_meta(cfg.data.root)
    reader = build_reader(
        cfg, cfg.data.train_split, meta, train=True, batch_size=cfg.train.batch_size, device="cpu"
    )
    batches = reader.batches()
    next(batches)  # warm-up: first shard read, workers started
    samples = count = 0
    bar = ProgressBar(0, desc="bench data", unit="batch")
    started = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - started) < seconds:
            samples += next(batches).images.shape[0]
            count += 1
            bar.update(1)
        elapsed = time.perf_counter() - started
    finally:
        bar.close()
        batches.close()
    return {
        "samples_per_s": round(samples / elapsed, 1),
        "samples": samples,
        "batches": count,
        "seconds": round(elapsed, 2),
        "batch_size": cfg.train.batch_size,
        "num_workers": reader.num_workers,
        "dataset": meta["dataset"],
        "image_shape": list(meta["image_shape"]),
        "augmentation": {k: v for k, v in vars(reader.augment).items() if v},
        "resampled": reader.resampled,
    }
