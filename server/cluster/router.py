"""Placement: which replica a new session goes to, through Ray Serve's request-router extension point.

Ray Serve calls `choose_replicas` for every request of the avatar deployment made through a handle in
this process (the front door). A session is one request (`session(sid)`, server/cluster/replica.py) that
places it and lasts as long as it does, so the router decides once per session: it ranks the replicas by
room, the most first. Room is the free session slots a replica reported in its routing stats
(`record_routing_stats`, every `STATS_PERIOD_S`; zero when its own admission would refuse one more,
server/cluster/replica_app.py), minus the sessions this router placed there since those stats may have
been taken; ties go to more real-time headroom, then more free GPU memory. The ranking only orders the
replicas: the replica itself is the authority and answers `busy` when it has no room after all.

Stickiness needs nothing here: the session's later messages travel on the relay socket its placement
named, not through Serve, because a replica being drained leaves every router's candidates at once and
could no longer be reached through it (docs/cluster.md).

The request-router API is alpha in Ray 2.60 (hence the pinned `ray[serve]==2.60.0` of the `cluster`
extra). Not mixed with `FIFOMixin`, which hands a chosen replica to the oldest pending request, possibly
another session's; the base class matches replicas to requests by their own id.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

STATS_PERIOD_S = 0.5
"""How often Serve polls each replica's `record_routing_stats`."""
RECENT_S = 2 * STATS_PERIOD_S + 1.0
"""A placement counts against its replica's reported room for this long: until stats taken after it
have surely arrived (Serve's controller polls them and broadcasts them to the routers). Counting it twice
meanwhile only makes the ranking cautious."""
UNREPORTED_FREE = 1e6
"""The room of a replica whose stats have not arrived yet: it has just started, empty, so it ranks first;
finite, so this router's own placements on it still count."""


class Ranked(Protocol):
    """What the ranking reads of a replica (Serve's `RunningReplica`)."""

    @property
    def replica_id(self) -> Any: ...

    @property
    def routing_stats(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Ranked)


def rank_by_room(replicas: Sequence[R], placed: Mapping[Any, int]) -> list[R]:
    """`replicas` from the most room to the least. `placed`: sessions placed on each (by id) that its
    stats may not count yet. A replica without stats yet has just started, empty: it comes first (so a
    replica the autoscaler just added takes the next session)."""

    def room(r: R) -> tuple[float, float, float]:
        stats = r.routing_stats or {}
        free = float(stats.get("free", UNREPORTED_FREE)) - placed.get(r.replica_id, 0)
        return free, float(stats.get("headroom", 0.0)), float(stats.get("gpu_free_bytes", 0))

    return sorted(replicas, key=room, reverse=True)


class SessionRouter(RequestRouter):
    """Room-first placement of sessions (module docstring). Its state lives on the router's own loop."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.recent: dict[ReplicaID, deque[float]] = {}
        """Monotonic times of this router's placements on each replica, for the last `RECENT_S`."""

    def placed_recently(self, now: float) -> dict[ReplicaID, int]:
        counts = {}
        for replica_id, times in self.recent.items():
            while times and now - times[0] > RECENT_S:
                times.popleft()
            counts[replica_id] = len(times)
        return counts

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ranked = rank_by_room(candidate_replicas, self.placed_recently(time.monotonic()))
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.recent.setdefault(replica_id, deque()).append(time.monotonic())

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.recent.pop(replica_id, None)
