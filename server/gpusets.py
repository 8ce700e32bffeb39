"""GPU sets: one model replica per GPU, each with its own worker thread(s), admission and step governor.

`liveavatar serve --gpus N` builds N independent replicas of the generator, one per device (`cuda:0` ..
`cuda:N-1`, or the `devices` setting); the backend builds them (`server/model.py` asks it), this
module bundles each with what
serves it. A new session is placed on a set when it opens: the sets are tried in order of fewest admitted
sessions (ties: lowest index) and the first whose `Admission` lets it in takes it; when every set refuses,
the client gets `busy` with a retry hint. The session then uses only that set's generator and worker for
its whole life (blocks, switches, close) and its reservation is released there when it ends.

With `--gpus-per-session K` > 1 a set is K GPUs (named `cuda:0+cuda:1`) whose generator runs one rank
process per GPU and pipelines each session's blocks through them (liveavatar/backends/liveavatar/pipelined.py): a faster
session rather than more sessions. Such a set has no step governor (its step count is fixed), its
admission reads the least free memory of its GPUs, and its load meter is fed by the sessions with the
pipeline's measured block interval. With one set (the default, and always for the preview backend)
the server behaves as before sets existed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from liveavatar.generator import AvatarSpec, Generator, Size
from server.admission import Admission, Busy, cuda_memory_probe
from server.config import ServerConfig
from server.cpu import CpuBudget
from server.load import StepGovernor
from server.metrics import SetSnapshot
from server.model import SET_JOIN, on_device, set_devices
from server.protocol import ProtocolError
from server.worker import GpuWorker

T = TypeVar("T")


@dataclass(eq=False)
class GpuSet:
    """One model replica and what serves its sessions."""

    index: int
    device: str
    generator: Generator
    worker: GpuWorker
    admission: Admission
    governor: StepGovernor | None
    helper: cf.ThreadPoolExecutor = field(default_factory=lambda: cf.ThreadPoolExecutor(1))
    """The one thread that encodes new avatars off the worker (`prepare`). One, long-lived: every thread
    that runs a matmul on a GPU keeps a cuBLAS workspace there for as long as it lives (32 MiB on an H200,
    measured), so a pool of helper threads would grow the set's memory by one workspace per thread it woke."""
    sessions: set[str] = field(default_factory=set)
    """Ids of the sessions open on this set (admitted ones still opening are only in `admission`)."""

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` with this set's GPU as the thread's current device."""
        with on_device(self.device):
            return fn(*args)

    async def prepare(self, spec: AvatarSpec, size: Size) -> None:
        """A new avatar's encodings (VAE, umT5) on the set's helper thread, not on the worker thread that
        steps every session of the set, so other sessions keep their pace while this one opens or switches."""
        await asyncio.get_running_loop().run_in_executor(self.helper, self.call, self.generator.prepare, spec, size)

    def steps_now(self) -> int:
        """The denoising steps for this set's next blocks, from its own load."""
        assert self.governor is not None
        return self.governor.update(len(self.sessions))

    def snapshot(self) -> SetSnapshot:
        return SetSnapshot(
            index=self.index,
            device=self.device,
            sessions=len(self.sessions),
            admitted=self.admission.sessions,
            worker_queue=self.worker.pending,
            sample_steps=self.governor.steps if self.governor is not None else 0,
        )


def build_set(
    index: int,
    device: str,
    generator: Generator,
    config: ServerConfig,
    probe_device: str | None = None,
    name: str = "generator",
) -> GpuSet:
    """Worker, admission and governor for `generator` on `device`. `probe_device`: the GPU whose free
    memory admission reads (None: the current one, as for a single set); `name`: of its threads."""
    threads = config.workers or generator.worker_threads
    worker = GpuWorker(threads, name=name, init=_device_init(device))
    block_s = generator.frames_per_block / generator.fps
    admission = Admission(
        generator,
        worker.load,
        block_s,
        config.memory_budget_gib,
        config.realtime_capacity,
        set_memory_probe(probe_device),
        CpuBudget(config.cpu_capacity, config.cpu_session_cost) if generator.cpu_bound else None,
    )
    governor = None
    if generator.step_control:
        governor = StepGovernor(worker.load, generator.sample_steps, block_s)
    helper = cf.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-prepare")
    return GpuSet(index, device, generator, worker, admission, governor, helper)


def set_memory_probe(device: str | None) -> Callable[[], tuple[int, int, int]] | None:
    """Admission's memory probe for a set: its GPU's; for a pipelined set the GPU with the least free
    memory (read from this process, which holds none of the ranks' caches: cached-unused counts 0)."""
    if device is None or SET_JOIN not in device:
        return cuda_memory_probe(device)
    probes = [p for p in (cuda_memory_probe(d) for d in set_devices(device)) if p is not None]
    if not probes:
        return None

    def probe() -> tuple[int, int, int]:
        free, total, _ = min((p() for p in probes), key=lambda r: r[0])
        return free, total, 0

    return probe


def _device_init(device: str) -> Callable[[], None] | None:
    if not device.startswith("cuda:") or SET_JOIN in device:
        return None

    def init() -> None:
        import torch

        torch.cuda.set_device(torch.device(device))

    return init


class GpuSets:
    """The server's GPU sets and which set each session was placed on."""

    def __init__(self, sets: list[GpuSet] | None = None) -> None:
        self.sets: list[GpuSet] = sets or []
        self._placed: dict[str, GpuSet] = {}

    def __len__(self) -> int:
        return len(self.sets)

    def __iter__(self) -> Iterator[GpuSet]:
        return iter(self.sets)

    def __getitem__(self, index: int) -> GpuSet:
        return self.sets[index]

    @property
    def devices(self) -> list[str]:
        return [s.device for s in self.sets]

    def place(self, sid: str, size: Size) -> GpuSet:
        """Admit session `sid` on the set with the fewest admitted sessions that takes it, or raise
        ProtocolError("busy") with a retry hint when none does."""
        refusals: list[tuple[GpuSet, Busy]] = []
        healthy = [s for s in self.sets if s.generator.failure is None]
        if not healthy:
            why = "; ".join(f"set {s.index} ({s.device}): {s.generator.failure}" for s in self.sets)
            raise ProtocolError("generation_failed", f"every GPU set has failed, the server needs a restart ({why})")
        for gset in sorted(healthy, key=lambda s: (s.admission.sessions, s.index)):
            try:
                gset.admission.admit(sid, size)
            except Busy as busy:
                refusals.append((gset, busy))
                continue
            self._placed[sid] = gset
            return gset
        if len(refusals) == 1:  # one set: its own refusal, word for word
            raise refusals[0][1]
        refusals.sort(key=lambda r: r[0].index)
        reasons = "; ".join(f"set {s.index} ({s.device}): {busy.why}" for s, busy in refusals)
        raise Busy(f"all {len(self.sets)} GPU sets are full ({reasons})", min(b.retry_s for _, b in refusals))

    def of(self, sid: str) -> GpuSet | None:
        """The set session `sid` was placed on (None once it has ended)."""
        return self._placed.get(sid)

    def opened(self, sid: str) -> None:
        """Session `sid` is open (registered) on its set."""
        self._placed[sid].sessions.add(sid)

    def release(self, sid: str) -> None:
        """Session `sid` ended (or never opened): free its reservation on its set. Idempotent."""
        gset = self._placed.pop(sid, None)
        if gset is not None:
            gset.sessions.discard(sid)
            gset.admission.release(sid)

    def snapshots(self) -> list[SetSnapshot]:
        return [s.snapshot() for s in self.sets]

    def close(self) -> None:
        """Stop every set's worker threads and what its generator runs (blocking)."""
        for gset in self.sets:
            gset.helper.shutdown(wait=False, cancel_futures=True)
            gset.worker.close()
            gset.generator.shutdown()
        self.sets = []
        self._placed.clear()
