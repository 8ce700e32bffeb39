"""How many replicas the sessions need: a Ray Serve autoscaling policy on the replicas' session count.

Each replica reports `{"sessions": n}` (`record_autoscaling_stats`, server/cluster/replica.py); Serve
averages it over its look-back window per replica and calls the policy with the result. The policy keeps
room for `spare_sessions` more sessions than run now:

    replicas = ceil((sessions + spare_sessions) / sessions_per_replica)

Serve then bounds that by `replicas_min` / `replicas_max` and applies the up- and downscale delays
(`_apply_autoscaling_config` wraps every custom policy). Scaling down removes replicas in place; a
removed replica drains its sessions first (docs/cluster.md).

This module is cloudpickled into the Serve controller by value: it imports nothing of the project.
"""

from __future__ import annotations

import math
from typing import Any

SESSIONS_METRIC = "sessions"


class SessionsPolicy:
    """The policy object Serve instantiates once (with `policy_kwargs`) and calls every tick."""

    def __init__(self, sessions_per_replica: int = 1, spare_sessions: int = 1) -> None:
        self.sessions_per_replica = max(1, int(sessions_per_replica))
        self.spare_sessions = max(0, int(spare_sessions))

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """`ctx`: Serve's `AutoscalingContext`; returns (replicas wanted, policy state)."""
        per_replica = ctx.aggregated_metrics.get(SESSIONS_METRIC) or {}
        sessions = sum(per_replica.values())
        return self.replicas_for(sessions, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas), {}

    def replicas_for(self, sessions: float, least: int, most: int) -> int:
        """Replicas for `sessions` running sessions (a look-back average, so possibly fractional)."""
        wanted = math.ceil((round(sessions, 3) + self.spare_sessions) / self.sessions_per_replica)
        return max(least, min(most, wanted))
