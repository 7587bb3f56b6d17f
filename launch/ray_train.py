"""Run `capsdist train` inside Ray Train workers (DeepSpeed inside each worker).

    python launch/ray_train.py --num-workers 4 -c configs/mnist.yaml data.root=/shared/mnist
    RAY_ADDRESS=ray://head:10001 python launch/ray_train.py ...   # on a running Ray cluster
    ray job submit --working-dir . -- python launch/ray_train.py --num-workers 16 -c ...

Each worker runs the very same training loop as every other launcher (capsdist/tune/trial.py
builds the TorchTrainer). run.dir and data.root must be on storage every node can see.
"""

from __future__ import annotations

import argparse
import json
import os

import ray
import torch

from capsdist.config import load_config
from capsdist.data import is_remote
from capsdist.tune.trial import torch_trainer


def train_worker(config: dict) -> None:
    from capsdist.train import run_training

    result = run_training(config["cfg"])
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("-c", "--config", action="append", default=[], required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # Resolve (and validate) the config here, with paths made absolute: Ray runs each worker in
    # a working directory of its own.
    cfg = load_config(args.config, args.overrides)
    if cfg.data.root and not is_remote(cfg.data.root):
        cfg.data.root = os.path.abspath(cfg.data.root)
    cfg.run.dir = os.path.abspath(cfg.run.dir)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    trainer = torch_trainer(
        train_worker,
        {"cfg": cfg},
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=1.0 if torch.cuda.is_available() else 0.0,
        name="capsdist",
        storage_path=os.path.join(cfg.run.dir, "ray"),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
