"""Converters and generators that write capsdist's webdataset shards + meta.json (one-time work).

Each `make_*` function writes one data set into an output folder and returns a summary dict;
`data_tools.cli.register` exposes them as `capsdist data ...`. Raw data sets are rows of
`data_tools.converters.CONVERTERS`; every writer ends in `data_tools.shards.write_dataset`.
"""

from data_tools.converters import (
    make_affnist,
    make_cifar10,
    make_fashion_mnist,
    make_mnist,
    make_smallnorb,
)
from data_tools.destination import DataToolError
from data_tools.from_mnist import make_affnist_like, make_expanded_mnist, make_multimnist
from data_tools.index import make_index
from data_tools.mnist_sample import make_mnist_sample
from data_tools.synthetic import make_synthetic_shards

__all__ = [
    "DataToolError",
    "make_affnist",
    "make_affnist_like",
    "make_cifar10",
    "make_expanded_mnist",
    "make_fashion_mnist",
    "make_index",
    "make_mnist",
    "make_mnist_sample",
    "make_multimnist",
    "make_smallnorb",
    "make_synthetic_shards",
]
