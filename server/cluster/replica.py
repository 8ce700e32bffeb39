"""The avatar replica: a Ray Serve deployment whose every replica is a `ReplicaApp` (the single-host server)
on its own GPU set (`gpus_per_session` GPUs from Ray) or, with the preview backend, a CPU slot.

A session's placement and lifetime are one streaming request, `session(sid, avoid)`, made by the front
door through Serve with the router of server/cluster/router.py (`avoid`: replicas that refused it already):

    yields {"refused": <busy error>, "replica": <id>}   no room here (the front door asks the next), or
    yields {"url", "key", "replica", "node", ...}       a slot is held: relay the offer to `url`
    yields {"connected": True}                          the session's peer connection came up
    returns                                             the session ended

Because the request lasts as long as the session, Serve's own machinery does the rest: a replica being
removed (scale-down, update) waits for its running requests, i.e. sessions, up to `drain_timeout_s`
(`graceful_shutdown_timeout_s`); a replica or node that dies fails the request in the front door at once
(ActorDiedError, ActorUnavailableError), which tells that session's client `replica_lost`. The session's
messages themselves do not go through Serve: a draining replica leaves every router's candidates at once,
so they travel on the relay socket the placement named.

The replica also reports its room to the router (`record_routing_stats`), its sessions to the autoscaler
(`record_autoscaling_stats`), its health (`check_health`), and itself to the registry every second.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray
from ray import serve

from server.admission import cuda_memory_probe
from server.cluster.registry import REPORT_S, GpuReport, ReplicaReport
from server.cluster.replica_app import ReplicaApp
from server.config import ServerConfig, replica_port_range
from server.model import set_devices
from server.tasks import log_task_failure

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 2.0


class AvatarReplica:
    """The Serve deployment class (server/cluster/deploy.py makes it one)."""

    async def __init__(self, settings: dict[str, Any], registry: Any) -> None:  # type: ignore[misc]  # Serve awaits it
        """`settings`: the front door's `ServerConfig` as a dict; `registry`: a handle to the Registry."""
        front = ServerConfig(**settings).validate()
        self.key = secrets.token_urlsafe(24)
        self.app = ReplicaApp(front.replica_config(self.key), replica_port_range(front))
        await self.app.start()
        gc.collect()  # as `liveavatar serve` does: the start-up heap out of the collector's walks
        gc.freeze()
        context = ray.get_runtime_context()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.actor = context.get_actor_name() or ""
        self.node = context.get_node_id()
        self.host = ray.util.get_node_ip_address()
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"ws://{shown}:{self.app.port}/ws"
        self.drain_timeout_s = front.drain_timeout_s
        self.started = time.time()
        self.registry = registry
        self._gpus = [(d, cuda_memory_probe(d)) for s in self.app.sets for d in set_devices(s.device)]
        self._report_failures = 0
        await self._report()  # the front door finds it as soon as Serve calls it ready
        self._reporter = asyncio.create_task(self._report_every(REPORT_S), name="registry-report")
        self._reporter.add_done_callback(log_task_failure)
        log.info("replica %s serving at %s on node %s", self.replica, self.url, self.node)

    # ---- sessions ---------------------------------------------------------------------------------

    async def session(self, sid: str, avoid: Sequence[str] = ()) -> AsyncIterator[dict[str, Any]]:
        """One session's placement and lifetime (module docstring). `avoid`: replicas that refused this
        session already, for the router (server/cluster/router.py) to rank last. Cancelled by its front door
        (or its front door gone), the session itself is left alone: its relay decides
        (server/cluster/replica_app.py)."""
        refusal = self.app.reserve(sid)
        if refusal is not None:
            yield {"refused": dict(refusal), "replica": self.replica}
            return
        try:
            yield self.placement()
            session = await self.app.wait_open(sid)
            if session is None:
                return
            while session.waiting_for_peer and not session.closed.is_set():
                await asyncio.sleep(0.1)
            if not session.closed.is_set():
                yield {"connected": True}
            await session.closed.wait()
        finally:
            self.app.release(sid)

    def placement(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "actor": self.actor,
            "node": self.node,
            "host": self.host,
            "url": self.url,
            "key": self.key,
        }

    # ---- what Serve asks --------------------------------------------------------------------------
    # `async def`: Serve then runs them on this replica's event loop, the one its sessions change admission
    # on. Plain methods would run on a thread of Serve's pool (RAY_SERVE_RUN_SYNC_IN_THREADPOOL) and read
    # admission's dictionaries while the loop adds and removes sessions.

    async def record_routing_stats(self) -> dict[str, Any]:
        """For the router's ranking (server/cluster/router.py), polled every `STATS_PERIOD_S`."""
        room = self.app.room()
        gpu_free = min((p()[0] for _, p in self._gpus if p is not None), default=0)
        return {
            "capacity": room.capacity,
            "sessions": room.sessions,
            "free": room.free,
            "headroom": room.headroom,
            "gpu_free_bytes": gpu_free,
            "held": self.app.held_ids(),
            "taken_at": time.time(),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """For the autoscaling policy (server/cluster/autoscale.py)."""
        return {"sessions": float(self.app.held())}

    async def check_health(self) -> None:
        """Serve replaces a replica whose control socket is gone or whose every GPU set has failed."""
        problem = self.app.problem()
        if problem:
            raise RuntimeError(problem)

    async def __del__(self) -> None:
        """After Serve drained the running requests (sessions): wait for sessions that lost their relay
        (they end with their peer connection), at most the drain deadline, then stop."""
        self._reporter.cancel()
        deadline = time.monotonic() + self.drain_timeout_s
        while self.app.detached and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        try:
            async with asyncio.timeout(REPORT_TIMEOUT_S):
                await self.registry.leave.remote(self.replica)
        except Exception as exc:  # the registry may be gone first; it forgets stale replicas anyway
            log.info("replica %s: leaving the registry failed: %r", self.replica, exc)
        await self.app.stop()

    # ---- reports ----------------------------------------------------------------------------------

    def report(self) -> ReplicaReport:
        room = self.app.room()
        snaps = [s.snapshot() for s in self.app.registry]
        gpus = []
        for device, probe in self._gpus:
            if probe is not None:
                free, total, _ = probe()
                gpus.append(GpuReport(device=device, used_bytes=total - free, total_bytes=total))
        metrics = self.app.metrics
        return ReplicaReport(
            replica=self.replica,
            actor=self.actor,
            node=self.node,
            host=self.host,
            url=self.url,
            key=self.key,
            info=self.app.backend_info(),
            capacity=room.capacity,
            sessions=room.sessions,
            free=room.free,
            busy_reason=room.why,
            fps=[s.fps for s in snaps],
            lag_s=[s.lag_s for s in snaps if s.lag_s is not None],
            queue_depth=sum(s.queue_depth for s in snaps),
            worker_queue=sum(s.worker.pending for s in self.app.sets),
            blocks_generated=metrics.blocks_generated,
            frames_sent=metrics.frames_sent,
            errors=dict(metrics.errors),
            gpus=gpus,
            started=self.started,
        )

    async def _report(self) -> None:
        try:
            async with asyncio.timeout(REPORT_TIMEOUT_S):
                await self.registry.report.remote(self.report())
            self._report_failures = 0
        except Exception as exc:  # the registry restarting: the next report finds it again
            self._report_failures += 1
            if self._report_failures in (1, 10) or self._report_failures % 60 == 0:
                log.warning(
                    "replica %s: report to the registry failed (%d in a row): %r",
                    self.replica,
                    self._report_failures,
                    exc,
                )

    async def _report_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            await self._report()
