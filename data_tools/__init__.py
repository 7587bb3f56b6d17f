"""Converters and generators that write capsdist's webdataset shards + meta.json (one-time work).

Each `make_*` function writes one data set into an output folder and returns a summary dict;
`data_tools.cli.register` exposes them as `capsdist data ...`.
"""

from data_tools.errors import DataToolError
from data_tools.mnist import make_mnist
from data_tools.mnist_sample import make_mnist_sample
from data_tools.synthetic import make_synthetic_shards

__all__ = ["DataToolError", "make_mnist", "make_mnist_sample", "make_synthetic_shards"]
