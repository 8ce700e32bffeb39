"""Placement: which replica a new session goes to, through Ray Serve's request-router extension point.

Ray Serve calls `choose_replicas` for every request of the avatar deployment made through a handle in
this process (the front door). A session is one request (`session(sid, avoid)`,
server/cluster/replica.py) that places it and lasts as long as it does, so the router decides once per
session: it ranks the replicas by room, the most first. Room is the free session slots a replica reported
in its routing stats (`record_routing_stats`, every `STATS_PERIOD_S`; zero when its own admission would
refuse one more, server/cluster/replica_app.py), minus the sessions this router placed there that those
stats do not hold yet: the stats name the sessions they count (`held`) and when they were taken
(`taken_at`), so a placement is counted once however late the stats arrive (within `FORGET_S`, and with
hosts' clocks within `SETTLE_S` of each other; outside that the replica's refusal still holds). Ties go to more
real-time headroom, then more free GPU memory. Replicas that already refused this session (`avoid`, the
front door placing it again) rank last. The ranking only orders the replicas: the replica itself is the
authority and answers `busy` when it has no room after all.

Stickiness needs nothing here: the session's later messages travel on the relay socket its placement
named, not through Serve, because a replica being drained leaves every router's candidates at once and
could no longer be reached through it (docs/cluster.md).

The request-router API is alpha in Ray 2.60 (hence the pinned `ray[serve]==2.60.0` of the `cluster`
extra). Not mixed with `FIFOMixin`, which hands a chosen replica to the oldest pending request, possibly
another session's; the base class matches replicas to requests by their own id.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

STATS_PERIOD_S = 0.5
"""How often Serve polls each replica's `record_routing_stats`."""
SETTLE_S = 2.0
"""A routed session holds its replica's slot within this long (the request's hop, plus the clock skew
between two hosts of one cluster, NTP-synchronised): stats taken that much later which do not hold it
mean it ended or was refused there, and it stops counting."""
FORGET_S = 30.0
"""A placement on a replica that has sent no stats since counts this long at most."""
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


def rank_by_room(replicas: Sequence[R], placed: Mapping[Any, int], avoid: Collection[str] = ()) -> list[R]:
    """`replicas` from the most room to the least. `placed`: sessions placed on each (by id) that its
    stats do not count yet. A replica without stats yet has just started, empty: it comes first (so a
    replica the autoscaler just added takes the next session). Replicas whose `replica_id.unique_id` is in
    `avoid` come after all others, in the same order among themselves."""

    def room(r: R) -> tuple[bool, float, float, float]:
        stats = r.routing_stats or {}
        free = float(stats.get("free", UNREPORTED_FREE)) - placed.get(r.replica_id, 0)
        avoided = r.replica_id.unique_id in avoid
        return not avoided, free, float(stats.get("headroom", 0.0)), float(stats.get("gpu_free_bytes", 0))

    return sorted(replicas, key=room, reverse=True)


def uncounted(placed: dict[str, float], stats: Mapping[str, Any], now: float) -> int:
    """How many of the sessions this router placed on a replica (`placed`: session id -> wall time
    routed) its `stats` do not count yet. Placements the stats can no longer come to count (taken
    `SETTLE_S` after them without holding them, or older than `FORGET_S`) are dropped from `placed`."""
    held = set(stats.get("held", ()))
    taken = float(stats.get("taken_at", 0.0))
    for sid, at in list(placed.items()):
        if sid not in held and (taken - at > SETTLE_S or now - at > FORGET_S):
            del placed[sid]
    return sum(sid not in held for sid in placed)


def session_of(request: PendingRequest | None) -> tuple[str | None, Collection[str]]:
    """The session id and the replicas to avoid of a `session(sid, avoid=...)` request; (None, ()) for
    any other request."""
    if request is None or request.metadata.call_method != "session":
        return None, ()
    sid = request.args[0] if request.args else request.kwargs.get("sid")
    return (str(sid) if sid is not None else None), tuple(request.kwargs.get("avoid", ()))


class SessionRouter(RequestRouter):
    """Room-first placement of sessions (module docstring). Its state lives on the router's own loop."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.placed: dict[ReplicaID, dict[str, float]] = {}
        """This router's placements on each replica that its stats may not count yet: session id -> wall
        time routed (wall time: the stats' `taken_at` comes from the replica's host)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        now = time.time()
        placed = {r.replica_id: uncounted(self.placed.get(r.replica_id, {}), r.routing_stats or {}, now)
                  for r in candidate_replicas}  # fmt: skip
        for gone in [rid for rid in self.placed if rid not in placed]:  # drained away, or removed
            if uncounted(self.placed[gone], {}, now) == 0:  # no stats: kept `FORGET_S` at most
                del self.placed[gone]
        ranked = rank_by_room(candidate_replicas, placed, session_of(pending_request)[1])
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        sid = session_of(pending_request)[0]
        if sid is not None:
            self.placed.setdefault(replica_id, {})[sid] = time.time()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.placed.pop(replica_id, None)
