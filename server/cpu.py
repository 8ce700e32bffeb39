"""CPU admission for the preview backend: a session is let in only if the cores can carry it.

A preview session costs CPU, not GPU: animation, VP8 and Opus encoding, SRTP and its share of the
event loop. When more sessions run than the cores can carry, every one of them degrades (frames
dropped, the loop late); so, as the GPU path refuses a session it cannot keep in real time, the
preview refuses one whose cost would take the process past `capacity` of the cores, with `busy`.

The cost of one session is measured: the process's CPU time per second of wall time, divided by the
sessions running, smoothed over the last samples. Until a session has run it is `PRIOR_COST`; a
configured cost (`cpu_session_cost`) replaces the measurement. The first session is always admitted.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from server.admission import Busy

PRIOR_COST = 0.5
"""Cores per preview session before one has been measured (512x512, docs/configuration.md)."""
SAMPLE_S = 1.0
SMOOTHING = 0.2
RETRY_S = 30


class CpuBudget:
    """Cores the sessions take, measured while they run; `check` refuses one more that would not fit."""

    def __init__(
        self,
        capacity: float,
        cost: float = 0.0,
        cores: int | None = None,
        cpu_time: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`capacity`: the fraction of the cores sessions may take (0: no check); `cost`: cores per
        session, 0 to measure it."""
        self.capacity = capacity
        self.configured = cost
        self.cores = cores or os.cpu_count() or 1
        self.measured: float | None = None
        self._cpu_time, self._clock = cpu_time, clock
        self._last = (clock(), cpu_time())

    def cost(self) -> float:
        """Cores one session takes: configured, else measured, else the prior."""
        return self.configured or self.measured or PRIOR_COST

    def sample(self, sessions: int) -> None:
        """One measurement since the last: the process's cores in use, per running session."""
        now, cpu = self._clock(), self._cpu_time()
        (then, cpu_then), self._last = self._last, (now, cpu)
        if sessions <= 0 or now <= then:
            return
        per_session = (cpu - cpu_then) / (now - then) / sessions
        self.measured = (
            per_session if self.measured is None else (SMOOTHING * per_session + (1 - SMOOTHING) * self.measured)
        )

    async def run(self, sessions: Callable[[], int]) -> None:
        """Sample every second, for as long as the server runs."""
        while True:
            await asyncio.sleep(SAMPLE_S)
            self.sample(sessions())

    def check(self, admitted: int) -> None:
        """Raise `busy` when `admitted + 1` sessions would take more than `capacity` of the cores."""
        if self.capacity <= 0 or admitted <= 0:
            return
        cost, allowed = self.cost(), self.capacity * self.cores
        if (admitted + 1) * cost > allowed:
            raise Busy(
                f"the CPU cannot carry {admitted + 1} preview sessions in real time ({cost:.2f} cores each, "
                f"{allowed:.1f} of {self.cores} cores for sessions)",
                RETRY_S,
            )
