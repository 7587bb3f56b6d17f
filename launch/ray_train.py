"""Run `capsdist train` inside Ray Train workers (DeepSpeed inside each worker).

    python launch/ray_train.py --num-workers 2 -c configs/debug_cpu.yaml data.root=/shared/mnist
    RAY_ADDRESS=head:6379 python launch/ray_train.py --num-workers 16 -c ... ray.storage_path=s3://b/x
    ray job submit --address http://head:8265 --working-dir . -- \
        python launch/ray_train.py --num-workers 16 -c configs/mnist.yaml data.root=/shared/mnist

Without RAY_ADDRESS (and outside `ray job submit`) Ray starts on this machine alone. Each worker
runs the very same training loop as every other launcher (capsdist/tune/trial.py); the `ray.*`
config keys set GPUs and CPUs per worker, restarts after a failure (the run resumes from its last
reported checkpoint), where Ray keeps the checkpoints, and how workers are placed on nodes.
run.dir and data.root must be on storage every node sees. Ends with the result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ray
import ray.train

from capsdist.config import Config, ConfigError, load_config
from capsdist.data import is_remote
from capsdist.errors import UserError
from capsdist.tune.storage import check_storage, ray_storage
from capsdist.tune.trial import gpus_per_worker, ray_launch_worker, torch_trainer


def fail(message: str, code: int = 2) -> None:
    print(f"ray_train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def job_working_dir() -> str:
    """The working_dir of the `ray job submit` running this driver ('' outside one): the driver
    then runs in a temporary copy of it."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return str(job.get("runtime_env", {}).get("working_dir") or "")


def absolute_paths(cfg: Config) -> None:
    """Ray runs each worker in a working directory of its own: hand them absolute paths. Under
    `ray job submit --working-dir` this process runs in a temporary copy of that directory, where
    a relative run.dir would vanish with the job: refuse it."""
    in_job_copy = bool(job_working_dir())
    for key in ("data.root", "run.dir", "data.cache_dir"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not value or is_remote(value) or os.path.isabs(value):
            continue
        if in_job_copy:
            raise ConfigError(
                f"{key}={value} is relative, and `ray job submit --working-dir` runs this job in "
                f"a temporary copy of that directory: give {key} as an absolute path on storage "
                "every node sees"
            )
        setattr(getattr(cfg, section), name, os.path.abspath(value))


def check_fits(num_workers: int, cpus: float, gpus: float, strategy: str, own_instance: bool):
    """Ray waits for resources it does not have. On a Ray instance started here nothing will
    add them: refuse. On a cluster an autoscaler may: warn."""
    total, nodes = ray.cluster_resources(), [n for n in ray.nodes() if n["Alive"]]
    problems = [
        f"{num_workers} workers x {per:g} {kind} = {num_workers * per:g} {kind}, the cluster has "
        f"{total.get(kind, 0):g} (ray.{kind.lower()}s_per_worker)"
        for kind, per in (("CPU", cpus), ("GPU", gpus))
        if num_workers * per > total.get(kind, 0) + 1e-9
    ]
    if strategy == "STRICT_SPREAD" and num_workers > len(nodes):
        problems.append(
            f"ray.placement_strategy=STRICT_SPREAD puts each of the {num_workers} workers on a "
            f"node of its own, the cluster has {len(nodes)}"
        )
    if not problems:
        return
    if own_instance:
        fail(f"{'; '.join(problems)}: start fewer workers (NNODES x NPROC), or set RAY_ADDRESS")
    print(
        f"ray_train: warning: {'; '.join(problems)}: waiting for an autoscaler to add them",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (ranks)")
    parser.add_argument("-c", "--config", action="append", default=[], required=True)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    if args.num_workers < 1:
        fail(f"--num-workers must be >= 1, got {args.num_workers}")
    try:
        cfg = load_config(args.config, args.overrides)  # checked before Ray starts
        absolute_paths(cfg)
        storage_path, name = ray_storage(
            cfg.ray.storage_path, cfg.run.dir, os.path.basename(cfg.run.dir)
        )
        check_storage(storage_path)
    except UserError as err:
        fail(str(err))
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address)
    gpus = gpus_per_worker(cfg.ray.gpus_per_worker, ray.cluster_resources())
    check_fits(
        args.num_workers,
        cfg.ray.cpus_per_worker,
        gpus,
        cfg.ray.placement_strategy,
        own_instance=address is None,
    )
    print(
        f"ray_train: {args.num_workers} workers x {cfg.ray.cpus_per_worker:g} CPU, {gpus:g} GPU "
        f"({cfg.ray.placement_strategy}); Ray storage {storage_path}/{name}; run.dir {cfg.run.dir}",
        file=sys.stderr,
        flush=True,
    )
    trainer = torch_trainer(
        ray_launch_worker,
        {"cfg": cfg},
        num_workers=args.num_workers,
        cpus_per_worker=cfg.ray.cpus_per_worker,
        gpus_per_worker=gpus,
        name=name,
        storage_path=storage_path,
        max_failures=cfg.ray.max_failures,
        placement_strategy=cfg.ray.placement_strategy,
        num_to_keep=cfg.train.keep_last,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        fail(f"training failed after ray.max_failures={cfg.ray.max_failures} restarts: {err}", 1)
    print(json.dumps(result.return_value), flush=True)


if __name__ == "__main__":
    main()
