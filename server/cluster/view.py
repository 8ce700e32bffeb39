"""The cluster in one view: the front door's `/metrics` and `/healthz`, from the replicas' latest reports
(server/cluster/registry.py, at most one report period old) and the front door's own counters.

Per replica and per host (a Ray node), with `replica`, `node` and `host` labels: sessions, capacity
and room, output fps and lag of its sessions, queues, GPU memory. Cluster-wide, the same gauges a single
host exports (`liveavatar_sessions_active`, `liveavatar_output_fps`, `liveavatar_output_lag_seconds`), so
a dashboard of one host keeps working; and the front door's placements: sessions placed, refused, the
time to place one, and errors by code (`replica_lost` among them).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from server.cluster.registry import ReplicaReport
from server.metrics import Metrics, metric_family

Metric = Callable[[str, str, str, Iterable[tuple[str, float]]], None]
"""metric(name, kind, help, [(labels, value)]): writes one metric family."""


@dataclass
class Placements:
    """The front door's timing of its placements (offer received → slot held on a replica)."""

    count: int = 0
    seconds_sum: float = 0.0
    answers: int = 0
    answer_seconds_sum: float = 0.0
    """Offer received → the replica's answer relayed."""

    def placed(self, seconds: float) -> None:
        self.count += 1
        self.seconds_sum += seconds

    def answered(self, seconds: float) -> None:
        self.answers += 1
        self.answer_seconds_sum += seconds


def health(reports: list[ReplicaReport]) -> tuple[int, str]:
    """`/healthz`: 200 with how many replicas are ready, or 503 when none is."""
    if not reports:
        return 503, "no replica ready: none has reported to the registry in the last few seconds\n"
    sessions = sum(r["sessions"] for r in reports)
    free = sum(r["free"] for r in reports)
    hosts = len({r["node"] for r in reports})
    return 200, f"ok: {len(reports)} replicas ready on {hosts} hosts ({sessions} sessions, room for {free} more)\n"


def render(backend: str, front: Metrics, placements: Placements, relayed: int, reports: list[ReplicaReport]) -> str:
    """Prometheus text (exposition 0.0.4). `relayed`: sessions this front door relays now."""
    lines: list[str] = []
    metric = functools.partial(metric_family, lines)

    fps = [f for r in reports for f in r["fps"]]
    lags = [lag for r in reports for lag in r["lag_s"]]
    metric("info", "gauge", "Backend serving the sessions.", [(f'{{backend="{_escape(backend)}"}}', 1)])
    metric("cluster_replicas_ready", "gauge", "Replicas that reported in the last few seconds.", [("", len(reports))])
    metric("sessions_active", "gauge", "Sessions open on every replica.", [("", sum(r["sessions"] for r in reports))])
    metric("frontdoor_sessions", "gauge", "Sessions this front door relays now.", [("", relayed)])
    metric("sessions_total", "counter", "Sessions this front door placed since start.", [("", front.sessions_total)])
    metric(
        "sessions_rejected_total",
        "counter",
        "Offers refused: every replica full (busy) or no replica ready.",
        [("", front.sessions_rejected)],
    )
    metric(
        "placement_seconds",
        "summary",
        "Offer received to a slot held on a replica.",
        [("_sum", placements.seconds_sum), ("_count", placements.count)],
    )
    metric(
        "answer_seconds",
        "summary",
        "Offer received to the replica's answer relayed.",
        [("_sum", placements.answer_seconds_sum), ("_count", placements.answers)],
    )
    metric("output_fps", "gauge", "Mean video frame rate per session, over every replica.", [("", _mean(fps))])
    metric("output_lag_seconds", "gauge", "Largest lag over every session.", [("", max(lags, default=0.0))])
    _replicas(metric, reports)
    _hosts(metric, reports)
    metric(
        "errors_total",
        "counter",
        "Error replies clients got, by code (the front door's own and those it relayed from replicas).",
        [(f'{{code="{_escape(code)}"}}', n) for code, n in sorted(front.errors.items())],
    )
    return "\n".join(lines) + "\n"


def _replicas(metric: Metric, reports: list[ReplicaReport]) -> None:
    labelled = [(_labels(replica=r["replica"], node=r["node"], host=r["host"]), r) for r in reports]
    for name, help_text, value in (
        ("replica_sessions", "Sessions open on each replica (and placed, opening).", lambda r: r["sessions"]),
        ("replica_capacity", "Session slots of each replica.", lambda r: r["capacity"]),
        ("replica_free", "Sessions each replica would take now (0: its admission refuses).", lambda r: r["free"]),
        ("replica_output_fps", "Mean video frame rate of each replica's sessions.", lambda r: _mean(r["fps"])),
        ("replica_output_lag_seconds", "Largest lag of each replica's sessions.", lambda r: max(r["lag_s"], default=0)),
        ("replica_queue_depth", "Blocks generated but not yet played, on each replica.", lambda r: r["queue_depth"]),
        ("replica_worker_queue_depth", "Generator calls waiting on each replica.", lambda r: r["worker_queue"]),
        ("replica_blocks_generated_total", "Blocks each replica generated.", lambda r: r["blocks_generated"]),
        ("replica_frames_sent_total", "Video frames each replica sent.", lambda r: r["frames_sent"]),
    ):
        kind = "counter" if name.endswith("_total") else "gauge"
        metric(name, kind, help_text, [(labels, value(r)) for labels, r in labelled])
    gpus = [
        (_labels(replica=r["replica"], node=r["node"], host=r["host"], device=g["device"]), g)
        for r in reports
        for g in r["gpus"]
    ]
    if gpus:
        metric(
            "replica_gpu_memory_used_bytes",
            "gauge",
            "GPU memory in use, per replica and device.",
            [(labels, g["used_bytes"]) for labels, g in gpus],
        )
        metric(
            "replica_gpu_memory_total_bytes",
            "gauge",
            "GPU memory, per replica and device.",
            [(labels, g["total_bytes"]) for labels, g in gpus],
        )


def _hosts(metric: Metric, reports: list[ReplicaReport]) -> None:
    hosts: dict[tuple[str, str], list[ReplicaReport]] = defaultdict(list)
    for r in reports:
        hosts[(r["node"], r["host"])].append(r)
    labelled = [(_labels(node=node, host=host), rs) for (node, host), rs in sorted(hosts.items())]
    metric("host_replicas", "gauge", "Replicas on each host.", [(labels, len(rs)) for labels, rs in labelled])
    metric(
        "host_sessions",
        "gauge",
        "Sessions on each host.",
        [(labels, sum(r["sessions"] for r in rs)) for labels, rs in labelled],
    )
    if any(r["gpus"] for r in reports):
        metric(
            "host_gpu_memory_used_bytes",
            "gauge",
            "GPU memory in use on each host (its replicas' GPUs).",
            [(labels, sum(g["used_bytes"] for r in rs for g in r["gpus"])) for labels, rs in labelled],
        )
        metric(
            "host_gpu_memory_total_bytes",
            "gauge",
            "GPU memory of each host's replicas.",
            [(labels, sum(g["total_bytes"] for r in rs for g in r["gpus"])) for labels, rs in labelled],
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
