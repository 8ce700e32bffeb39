"""A local Ray cluster for the cluster tests (tests/test_cluster_*.py): a head node with no CPU for
replicas (the Serve controller and the registry take none) and worker nodes of one CPU each, told apart by
a custom resource, all on this machine. Each test module starts one (5-10 s) and shuts it down, Ray
processes included, whatever happens.

Every replica asks for one CPU and `avatar_host=1`, so each worker node holds at most one replica: two
replicas of one application are always on two nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZE = "128*128"
"""Preview sessions this small keep four of them, their peers and Ray within the CI machine's 2 cores."""
REPLICA = {"size": SIZE, "replica_resources": ["avatar_host=1"], "replica_cpus": 1.0}


@contextlib.contextmanager
def local_cluster(workers: int = 2) -> Iterator[Any]:
    """`ray.cluster_utils.Cluster` with `workers` worker nodes; this process is its driver."""
    import ray
    from ray.cluster_utils import Cluster

    # the nodes inherit this environment: their workers (the replicas) must import server.cluster
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for i in range(workers):
            cluster.add_node(num_cpus=1, resources={"avatar_host": 1, f"worker{i}": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def module_cluster() -> Iterator[Any]:
    """The body of each cluster test module's `cluster` fixture (module scope): two worker nodes, and
    afterwards no Ray process left running."""
    with local_cluster(workers=2) as c:
        yield c
    left = ray_processes()
    assert not left, f"Ray processes left running: {left}"


async def start_front_door(address: str, **fields: Any) -> Any:
    """An in-process front door (`server.cluster.frontdoor.FrontDoor`) of the cluster at `address`,
    listening on a free loopback port, with `fields` as its settings."""
    from server.cluster.frontdoor import FrontDoor
    from server.config import ServerConfig

    door = FrontDoor(ServerConfig(**{"host": "127.0.0.1", "port": 0, "cluster": address, **fields}).validate())
    await door.start()
    return door


def ray_processes(wait_s: float = 10.0) -> list[str]:
    """Command lines of Ray processes still running on this machine (raylet, gcs_server, workers) after up
    to `wait_s` for the ones shutting down to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        left = [line for line in out.splitlines() if "raylet" in line or "gcs_server" in line or "ray::" in line]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def delete_app(name: str) -> None:
    """Remove a Serve application and its replicas (each drains first)."""
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(name)


def node_of(cluster: Any, node_id: str) -> Any:
    """The `cluster_utils` node whose Ray node id is `node_id`."""
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


async def eventually(check: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """`check()` until it returns something true (a coroutine function is awaited); its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(step)


def media_seconds(client: Any, since: float) -> float:
    """Seconds of video media (RTP time) the client received after monotonic time `since`."""
    stamps = [pts for arrival, pts, _ in client.got.video if arrival >= since]
    return (stamps[-1] - stamps[0]) / 90_000 if len(stamps) > 1 else 0.0
