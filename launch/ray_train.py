"""Run `capsdist train` inside Ray Train workers (DeepSpeed inside each worker).

    python launch/ray_train.py --num-workers 4 -c configs/mnist.yaml data.root=/shared/mnist
    RAY_ADDRESS=ray://head:10001 python launch/ray_train.py ...   # on a running Ray cluster
    ray job submit --working-dir . -- python launch/ray_train.py --num-workers 16 -c ...

Ray Train starts the workers, sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR and joins them in
a torch process group; each worker then runs the very same training loop as every other
launcher. run.dir and data.root must be on storage every node can see.
"""

from __future__ import annotations

import argparse
import json
import os

import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from capsdist.config import load_config


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
    cfg.data.root = os.path.abspath(cfg.data.root) if cfg.data.root else ""
    cfg.run.dir = os.path.abspath(cfg.run.dir)
    use_gpu = torch.cuda.is_available()
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=args.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": args.cpus_per_worker},
        ),
        run_config=RunConfig(name="capsdist", storage_path=os.path.join(cfg.run.dir, "ray")),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
