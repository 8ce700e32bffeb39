"""How loaded the generator is, and what the server gives up when it cannot keep real time.

`LoadMeter` measures the worker's block time. Every session needs one block per block duration
(0.48 s), speaking or idle, so with `n` sessions on `t` threads the worker is behind real time when

    load = n x block_time / (t x block_duration) > 1.

Admission control refuses a session that would push the load over `realtime_capacity`, and
`StepGovernor` lowers the denoising steps while the load stays above 1 (see docs/architecture.md,
"Degrade order"): speech before idle blocks comes first and is the worker's scheduling, fewer
steps second, trimming late blocks to the lag bound last.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque


class LoadMeter:
    """Recent block times of one worker (thread-safe: recorded by worker threads)."""

    def __init__(self, threads: int = 1, keep: int = 16) -> None:
        self.threads = max(1, threads)
        self._times: deque[float] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        with self._lock:
            self._times.append(seconds)

    def block_seconds(self) -> float | None:
        """Median of the recent block times (robust to one slow block); None before the first."""
        with self._lock:
            return statistics.median(self._times) if self._times else None

    def forget(self) -> None:
        """Start over, e.g. after the step count changed and old times no longer apply."""
        with self._lock:
            self._times.clear()

    def load(self, sessions: int, block_duration: float) -> float:
        """Fraction of real time the worker needs for `sessions` sessions (0 when nothing is measured)."""
        measured = self.block_seconds()
        if measured is None or sessions <= 0:
            return 0.0
        return sessions * measured / (self.threads * block_duration)


class StepGovernor:
    """The server-wide denoising step count: lowered while the worker is behind real time, raised
    again (one step at a time) once the load with one more step would stay comfortably below 1."""

    def __init__(
        self,
        meter: LoadMeter,
        full_steps: int,
        block_duration: float,
        min_steps: int = 2,
        hold_s: float = 2.0,
        clock=time.monotonic,
    ) -> None:
        self.meter = meter
        self.full_steps = full_steps
        self.min_steps = min(min_steps, full_steps)
        self.block_duration = block_duration
        self.hold_s = hold_s
        self.steps = full_steps
        self.changes = 0
        self._clock = clock
        self._since = clock()

    def update(self, sessions: int) -> int:
        """The step count to use for the next blocks, given the sessions sharing the worker now."""
        now = self._clock()
        if now - self._since < self.hold_s:
            return self.steps
        load = self.meter.load(sessions, self.block_duration)
        if load > 1.0 and self.steps > self.min_steps:
            self._set(self.steps - 1, now)
        elif self.steps < self.full_steps and 0 < load * (self.steps + 1) / self.steps < 0.9:
            self._set(self.steps + 1, now)
        return self.steps

    def _set(self, steps: int, now: float) -> None:
        self.steps, self._since = steps, now
        self.changes += 1
        self.meter.forget()  # the times measured at the old count would decide the next change
