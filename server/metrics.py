"""Server-wide counters and the `/metrics` page in Prometheus text format (exposition 0.0.4).

Counters live here; gauges (active sessions, fps, lag, queue depth) are read from the sessions at
scrape time, so a gauge can never disagree with the server's own state.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class SessionSnapshot:
    """What one session reports about itself for metrics and the client's stats line."""

    fps: float
    lag_s: float | None
    onset_lag_s: float | None
    queue_depth: int
    blocks: int
    dropped_frames: int


@dataclass
class SetSnapshot:
    """One GPU set (a model replica with its own worker) for /metrics."""

    index: int
    device: str
    sessions: int
    """Sessions open on the set."""
    admitted: int
    """Sessions holding a reservation in the set's admission (open ones and ones being opened)."""
    worker_queue: int
    sample_steps: int
    """The set's step governor's denoising steps now (0: the backend has no such knob)."""


def metric_family(lines: list[str], name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
    """Append one Prometheus metric family (text exposition 0.0.4) named `liveavatar_<name>` to `lines`:
    its HELP and TYPE lines, then one line per (labels, value) sample (`labels`: "" or '{k="v",...}')."""
    lines.append(f"# HELP liveavatar_{name} {help_text}")
    lines.append(f"# TYPE liveavatar_{name} {kind}")
    for labels, value in samples:
        lines.append(f"liveavatar_{name}{labels} {value:g}")


@dataclass
class Metrics:
    sessions_total: int = 0
    sessions_rejected: int = 0
    frames_sent: int = 0
    audio_frames_sent: int = 0
    blocks_generated: int = 0
    step_seconds_sum: float = 0.0
    frames_dropped: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def render(
        self,
        backend: str,
        worker_queue: int,
        sessions: Iterable[SessionSnapshot],
        sets: Iterable[SetSnapshot] = (),
        realtime: dict | None = None,
    ) -> str:
        """Prometheus text; `realtime` is the start-up real-time plan (`RealtimePlan.to_message()`)."""
        snaps = list(sessions)
        gpu_sets = list(sets)
        lags = [s.lag_s for s in snaps if s.lag_s is not None]
        lines: list[str] = []
        metric = functools.partial(metric_family, lines)

        metric("info", "gauge", "Backend serving the sessions.", [(f'{{backend="{backend}"}}', 1)])
        metric("sessions_active", "gauge", "Sessions open now.", [("", len(snaps))])
        metric("sessions_total", "counter", "Sessions opened since start.", [("", self.sessions_total)])
        metric(
            "sessions_rejected_total",
            "counter",
            "Offers refused: max_sessions open, or busy (memory or real-time capacity).",
            [("", self.sessions_rejected)],
        )
        metric("frames_sent_total", "counter", "Video frames handed to the encoders.", [("", self.frames_sent)])
        metric(
            "audio_frames_sent_total",
            "counter",
            "20 ms audio frames handed to the encoders.",
            [("", self.audio_frames_sent)],
        )
        metric(
            "frames_dropped_total",
            "counter",
            "Video frames skipped because the encoder fell behind.",
            [("", self.frames_dropped)],
        )
        metric("blocks_generated_total", "counter", "Blocks the generator produced.", [("", self.blocks_generated)])
        metric("generator_step_seconds_sum", "counter", "Time spent in generator steps.", [("", self.step_seconds_sum)])
        metric(
            "output_fps",
            "gauge",
            "Mean video frame rate sent per session (last 2 s).",
            [("", sum(s.fps for s in snaps) / len(snaps) if snaps else 0.0)],
        )
        metric(
            "output_lag_seconds",
            "gauge",
            "Largest input-to-output lag over sessions (last block).",
            [("", max(lags) if lags else 0.0)],
        )
        metric(
            "queue_depth",
            "gauge",
            "Blocks generated but not yet played, summed over sessions.",
            [("", sum(s.queue_depth for s in snaps))],
        )
        metric("worker_queue_depth", "gauge", "Generator calls waiting for a worker thread.", [("", worker_queue)])
        if gpu_sets:
            labelled = [(f'{{set="{g.index}",device="{g.device}"}}', g) for g in gpu_sets]
            for name, help_text, field in (
                ("gpu_set_sessions", "Sessions open on each GPU set (a model replica on one device).", "sessions"),
                ("gpu_set_admitted", "Sessions holding a reservation on each GPU set (open or opening).", "admitted"),
                ("gpu_set_worker_queue_depth", "Generator calls waiting on each GPU set's worker.", "worker_queue"),
                (
                    "gpu_set_sample_steps",
                    "Denoising steps each GPU set's sessions run now (0: fixed by the backend).",
                    "sample_steps",
                ),
            ):
                metric(name, "gauge", help_text, [(labels, getattr(g, field)) for labels, g in labelled])
        if realtime is not None:
            metric(
                "realtime_ok",
                "gauge",
                "1 when one session keeps real time here (measured at start), else 0.",
                [("", 1 if realtime["keeps"] else 0)],
            )
            metric(
                "realtime_block_seconds",
                "gauge",
                "Predicted block time at the step count one session settles on.",
                [(f'{{steps="{realtime["steps"]}"}}', realtime["blockMs"] / 1000)],
            )
        metric(
            "errors_total",
            "counter",
            "Error replies by code.",
            [(f'{{code="{code}"}}', n) for code, n in sorted(self.errors.items())],
        )
        return "\n".join(lines) + "\n"
