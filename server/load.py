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
from dataclasses import dataclass

from server.protocol import RealtimePlanFields

MIN_GOVERNED_STEPS = 2
"""The fewest denoising steps the governor lowers a session to."""


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
        min_steps: int = MIN_GOVERNED_STEPS,
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


@dataclass
class RealtimePlan:
    """Whether one session keeps real time on a GPU set, and what would make it, from the block costs
    measured at start (the warm-up's steady blocks): `fixed_s` per block (audio features + VAE) and
    `per_step_s` per denoising step."""

    keeps: bool
    steps: int
    """The most steps (full count down to the governor's fewest) at which a block fits its 0.48 s;
    the fewest when none does."""
    block_s: float
    """Predicted block time at `steps`."""
    advice: str = ""
    """When it does not keep real time: the settings that would."""

    def to_message(self) -> RealtimePlanFields:
        return RealtimePlanFields(
            keeps=self.keeps, steps=self.steps, blockMs=round(self.block_s * 1000), advice=self.advice
        )


def plan_realtime(
    fixed_s: float, per_step_s: float, full_steps: int, min_steps: int, block_duration: float, width: int, height: int
) -> RealtimePlan:
    """The step count the governor will settle on for one session, and advice when even its fewest
    steps are slower than real time. Time scales with the steps (DiT) and, for another size, with the
    pixel count (DiT tokens and VAE pixels both do, to first order)."""
    for steps in range(full_steps, min_steps - 1, -1):
        block_s = fixed_s + steps * per_step_s
        if block_s <= block_duration:
            return RealtimePlan(True, steps, block_s)
    fewest = fixed_s + min_steps * per_step_s
    options = []
    if fixed_s + per_step_s <= block_duration < fewest:
        options.append("--sample-steps 1 (lower quality)")
    scale = (block_duration / fewest) ** 0.5
    w, h = int(width * scale) // 64 * 64, int(height * scale) // 64 * 64
    if w >= 128 and h >= 128:
        options.append(f"a size of at most {w}*{h} at {min_steps} steps")
    options.append("a faster GPU, or more GPUs per session (the timestep-forcing pipeline)")
    advice = (
        f"one session at {width}*{height} needs {fewest * 1000:.0f} ms per "
        f"{block_duration * 1000:.0f} ms block even at "
        f"{min_steps} steps, so it cannot keep real time here; lag stays bounded by dropping frames. Would keep it: "
        + "; ".join(options)
    )
    return RealtimePlan(False, min_steps, fewest, advice)


def plan_pipelined(
    interval_s: float, steps: int, block_duration: float, width: int, height: int, gpus: int
) -> RealtimePlan:
    """Whether one session keeps real time on a pipelined set, from its measured block interval; the
    step count is fixed there (liveavatar/backends/liveavatar/pipelined.py), so the advice is a smaller
    size, fewer steps or more GPUs."""
    if interval_s <= block_duration:
        return RealtimePlan(True, steps, interval_s)
    scale = (block_duration / interval_s) ** 0.5
    w, h = int(width * scale) // 64 * 64, int(height * scale) // 64 * 64
    advice = (
        f"one session at {width}*{height} over {gpus} GPUs needs {interval_s * 1000:.0f} ms per "
        f"{block_duration * 1000:.0f} ms block, so it cannot keep real time here; "
        "lag stays bounded by dropping frames. "
        f"Would keep it: a size of at most {w}*{h}; --sample-steps {max(1, steps - 1)}; or more GPUs per session"
    )
    return RealtimePlan(False, steps, interval_s, advice)
