"""Where the front door finds every replica: a small Serve deployment (one replica, no CPU) that each
avatar replica reports to every `REPORT_S`, with how to reach it and its latest figures.

Why a registry of our own and not Serve's view: a front door must reach each replica for `/metrics` and
`/healthz`, and reach the replica of a session for its signalling; Serve's routing stats are private to
each router and its controller lists replicas by actor name only. Reports flow one way (replica →
registry → front door), so a slow front door never holds a replica up. A replica that stops reporting
for `STALE_S` (dead, partitioned) drops out. The registry is part of the application: Serve restarts
it if it dies, and the replicas fill it again within one report period; it holds nothing else.
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

REPORT_S = 1.0
"""How often a replica reports."""
STALE_S = 3.5
"""A report older than this is a replica that is gone (or cut off)."""


class GpuReport(TypedDict):
    device: str
    used_bytes: int
    total_bytes: int


class ReplicaReport(TypedDict):
    """One replica about itself (built by `server.cluster.replica.AvatarReplica.report`)."""

    replica: str
    """Serve's replica id (unique)."""
    actor: str
    """Its actor's name (`SERVE_REPLICA::app#deployment#id`), for `ray.get_actor(name, namespace="serve")`."""
    node: str
    """Ray node id of its host."""
    host: str
    """Its host's address in the cluster."""
    url: str
    """The replica's control socket (`ws://host:port/ws`): where the front door relays signalling."""
    key: str
    """The bearer token that socket wants (minted by the replica; secret within the cluster)."""
    info: dict[str, Any]
    """The backend's side of the `config` message (backend, model, fps, framesPerBlock, size, maxLagMs)."""
    capacity: int
    sessions: int
    """Sessions open, counting those placed and still opening."""
    free: int
    """Sessions it would take now (0 when its admission refuses one more)."""
    busy_reason: str
    fps: list[float]
    """Output frame rate of each open session (last 2 s)."""
    lag_s: list[float]
    """Input-to-output lag of each open session's last block."""
    queue_depth: int
    worker_queue: int
    blocks_generated: int
    frames_sent: int
    errors: dict[str, int]
    gpus: list[GpuReport]
    started: float
    """Wall-clock time the replica started serving."""


class Registry:
    """The Serve deployment class (server/cluster/deploy.py makes it one). Its methods are `async def`, so
    Serve runs them one at a time on the registry's event loop, never side by side on pool threads."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}

    async def report(self, report: ReplicaReport) -> None:
        self._reports[report["replica"]] = (time.monotonic(), report)

    async def leave(self, replica: str) -> None:
        self._reports.pop(replica, None)

    async def replicas(self) -> list[ReplicaReport]:
        """The replicas that reported within `STALE_S`, oldest first."""
        now = time.monotonic()
        for replica, (seen, _) in list(self._reports.items()):
            if now - seen > STALE_S:
                self._reports.pop(replica, None)
        return sorted((r for _, r in self._reports.values()), key=lambda r: r["started"])
