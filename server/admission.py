"""Admission control: a session is let in only if its state fits in memory and the worker can still
keep every admitted session in real time; otherwise the client gets `busy` with a retry hint.

Memory: the generator estimates a session's state before it exists (`session_nbytes(size)`: KV rings,
condition cache, VAE cache, from `StreamingDiT.state_nbytes`). Against a configured budget the sum of
the admitted sessions' estimates must stay within it (the testable CPU path). On a GPU without a budget
the estimate must fit in what is free now, counting memory the allocator caches but does not use, and
minus what admitted sessions have not allocated yet (their rings grow on the first block) and a
working reserve for activations.

Speed: `LoadMeter` gives the measured block time; `n + 1` sessions must fit `realtime_capacity`. With
no session running a request is always let in as far as speed goes (a slow GPU must still serve one).

Each GPU set (`server/gpusets.py`) has its own `Admission`, over its own generator, worker and GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from liveavatar.generator import Generator, Size
from server.load import LoadMeter
from server.protocol import ProtocolError

GIB = 2**30
RESERVE_FRACTION = 0.08
"""Of the GPU's total memory, kept free for activations (attention, FFN, the VAE's full-size convs)."""


class Busy(ProtocolError):
    """A refusal: `busy` with a retry hint; `why` is the reason alone, for messages that combine several."""

    def __init__(self, why: str, retry_s: int) -> None:
        super().__init__("busy", f"server busy: {why}; retry in {retry_s} s", retry_after_s=retry_s)
        self.why = why
        self.retry_s = retry_s


class Admission:
    """Decides on each offer; holds the estimate of every admitted session until it closes."""

    def __init__(
        self,
        generator: Generator,
        meter: LoadMeter,
        block_duration: float,
        budget_gib: float = 0.0,
        realtime_capacity: float = 1.0,
        cuda_memory: Callable[[], tuple[int, int, int]] | None = None,
        cpu: Any = None,
    ) -> None:
        """`cuda_memory()` -> (free, total, cached but unused) bytes of the GPU, or None on CPU;
        `cpu`: the CPU budget (`server.cpu.CpuBudget`) of a backend that runs on the CPU."""
        self.generator = generator
        self.meter = meter
        self.block_duration = block_duration
        self.budget = int(budget_gib * GIB)
        self.realtime_capacity = realtime_capacity
        self.cuda_memory = cuda_memory
        self.cpu = cpu
        self.refused = 0
        self._held: dict[str, tuple[int, Callable[[], int]]] = {}

    def estimate(self, size: Size) -> int:
        return int(self.generator.session_nbytes(size))

    def admit(self, sid: str, size: Size, holding: Callable[[], int] = lambda: 0) -> int:
        """Reserve room for session `sid` or raise ProtocolError("busy"); returns the estimate.

        `holding()` reports what the session holds now, so what it has yet to allocate is known."""
        try:
            need = self.check(size)
        except Busy:
            self.refused += 1
            raise
        self._held[sid] = (need, holding)
        return need

    def check(self, size: Size) -> int:
        """Would one more session of `size` be admitted now? Raises `Busy` if not, else returns its
        estimate; reserves and counts nothing (a cluster replica reports its room with it)."""
        need = self.estimate(size)
        self._check_speed()
        if self.cpu is not None:
            self.cpu.check(len(self._held))
        self._check_memory(need)
        return need

    def attach(self, sid: str, holding: Callable[[], int]) -> None:
        """Tell an admitted session's reservation how to ask what the session holds now."""
        if sid in self._held:
            self._held[sid] = (self._held[sid][0], holding)

    def release(self, sid: str) -> None:
        self._held.pop(sid, None)

    @property
    def sessions(self) -> int:
        return len(self._held)

    def _check_speed(self) -> None:
        if self.realtime_capacity <= 0 or not self._held:
            return
        load = self.meter.load(len(self._held) + 1, self.block_duration)
        if load > self.realtime_capacity:
            block = self.meter.block_seconds() or 0.0
            self._busy(
                f"the GPU cannot keep {len(self._held) + 1} sessions in real time "
                f"({block * 1000:.0f} ms per block of {self.block_duration * 1000:.0f} ms)",
                retry_s=30,
            )

    def _check_memory(self, need: int) -> None:
        if need <= 0:
            return
        reserved = sum(max(n, holding()) for n, holding in self._held.values())
        if self.budget:
            if reserved + need > self.budget:
                self._busy(
                    f"a session needs {need / GIB:.2f} GiB; {(self.budget - reserved) / GIB:.2f} GiB of the "
                    f"{self.budget / GIB:.2f} GiB budget is left",
                    retry_s=60,
                )
            return
        if self.cuda_memory is None:
            return
        free, total, cached = self.cuda_memory()
        to_come = sum(max(0, n - holding()) for n, holding in self._held.values())
        available = free + cached - to_come - int(RESERVE_FRACTION * total)
        if need > available:
            self._busy(
                f"a session needs {need / GIB:.1f} GiB of GPU memory; {max(0, available) / GIB:.1f} GiB is free",
                retry_s=60,
            )

    def _busy(self, why: str, retry_s: int) -> None:
        raise Busy(why, retry_s)

    def snapshot(self) -> dict[str, Any]:
        return {"sessions": len(self._held), "reserved_bytes": sum(n for n, _ in self._held.values())}


def cuda_memory_probe(device: str | None = None) -> Callable[[], tuple[int, int, int]] | None:
    """(free, total, cached-unused) of CUDA `device` (`cuda:N`; None or `cuda`: the calling thread's
    current device), or None without CUDA or for a CPU device."""
    if device is not None and not device.startswith("cuda"):
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    where = None if device in (None, "cuda") else torch.device(device)

    def probe() -> tuple[int, int, int]:
        free, total = torch.cuda.mem_get_info(where)
        return free, total, torch.cuda.memory_reserved(where) - torch.cuda.memory_allocated(where)

    return probe
