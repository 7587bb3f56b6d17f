"""A throw-away two-node Ray cluster on one host for tests: a head on 127.0.0.2 and a second
raylet on 127.0.0.3, one CPU each, a small object store, started by the test process with
`ray.cluster_utils.Cluster` and stopped by it, every session file under a short temp dir.

Facts it relies on (Ray 2.60, measured: ../shared/reference/local_cluster_recipes.md §3): Ray
keeps loopback addresses other than 127.0.0.1 as given, so the two nodes have different IPs and
all traffic stays on loopback; RAY_TMPDIR moves the sessions and the `ray_current_cluster` file
(keep it short: Unix socket paths hold ~107 characters), so other Ray users on the machine
neither see this cluster nor are seen by it; with `~/.ray/auth_token` present Ray 2.60 turns on
token authentication unless RAY_AUTH_MODE=disabled, in every process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
OBJECT_STORE_BYTES = 100 * 2**20  # the default would reserve 30 % of the RAM per node


@contextlib.contextmanager
def two_node_ray_cluster() -> Iterator[dict[str, str]]:
    """Start the cluster; yield the variables a driver needs (RAY_ADDRESS, RAY_TMPDIR, ...).
    Raylets, and so Ray's workers, inherit this process's environment as it is now."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    env = {"RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    node = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            shutdown_at_exit=False,
            head_node_args={**node, "node_ip_address": HEAD_IP, "include_dashboard": False},
        )
        cluster.add_node(**node, node_ip_address=WORKER_IP)
        cluster.wait_for_nodes(timeout=120)
        yield {**env, "RAY_ADDRESS": cluster.address}
    finally:
        if cluster is not None:
            cluster.shutdown()  # stops every process it started, on both nodes
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)
