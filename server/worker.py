"""Runs generator calls on dedicated threads so the event loop never waits on the model.

The sessions of a GPU set share its generator and its worker. Each session's calls run one at a time
and in order (its state is not
thread-safe), and sessions take turns: the next call comes from the session that has waited longest,
so one busy session cannot starve the others — they are interleaved block by block. Urgent calls
(speech blocks, opening a session) go before routine ones (idle blocks): when the worker falls behind,
idle motion is what slows down first. Calls marked `measure` are timed into `block_times`, the
measured block time that admission control and the degrade policy read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from server.load import LoadMeter

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerBusy(RuntimeError):
    """A session queued more calls than allowed: its producer must wait for results first."""


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    urgent: bool = True
    measure: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


class GpuWorker:
    """A small pool of generator threads with per-session FIFO queues and round-robin turns."""

    def __init__(
        self,
        threads: int = 1,
        max_pending_per_session: int = 4,
        name: str = "generator",
        init: Callable[[], None] | None = None,
    ) -> None:
        """`init()` runs first on each thread (a GPU set's worker makes its GPU the thread's device)."""
        self.init = init
        self.max_pending = max_pending_per_session
        self.threads = max(1, threads)
        self.load = LoadMeter(self.threads)
        self.cpu_share: deque[float] = deque(maxlen=64)
        """Thread CPU time / wall time of recent measured calls: lower while the thread waits for the GIL
        held by another thread (or sleeps). Near 1 says little more: a CUDA synchronize spins by default,
        so waiting on the GPU counts as CPU time too."""
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {}
        self._turns: deque[str] = deque()  # sessions with work and no call running, oldest first
        self._busy: set[str] = set()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    async def run(self, key: str, fn: Callable[..., T], *args: Any, urgent: bool = True, measure: bool = False) -> T:
        """Run `fn(*args)` on a worker thread in `key`'s turn; awaits the result (or its exception).

        `urgent=False` lets every waiting urgent call go first; `measure` records the call's duration
        as a block time."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, args, loop, loop.create_future(), urgent, measure)
        with self._cond:
            if self._closed:
                raise RuntimeError("worker is closed")
            queue = self._queues.setdefault(key, deque())
            if len(queue) >= self.max_pending:
                raise WorkerBusy(f"session {key} has {len(queue)} generator calls waiting")
            queue.append(job)
            if key not in self._busy and key not in self._turns:
                self._turns.append(key)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled.set()  # not started yet: skipped; already running: result dropped
            raise

    def forget(self, key: str) -> None:
        """Drop a closed session's queue (its waiting calls are cancelled)."""
        with self._cond:
            for job in self._queues.pop(key, ()):
                job.cancelled.set()
                job.loop.call_soon_threadsafe(_cancel, job.future)
            if key in self._turns:
                self._turns.remove(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def _next_job(self) -> tuple[str, _Job] | None:
        with self._cond:
            while not self._turns and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = next((k for k in self._turns if self._queues[k][0].urgent), self._turns[0])
            self._turns.remove(key)
            job = self._queues[key].popleft()
            self._busy.add(key)
            return key, job

    def _done(self, key: str) -> None:
        with self._cond:
            self._busy.discard(key)
            queue = self._queues.get(key)
            if queue:
                self._turns.append(key)  # back of the line: the others go first
                self._cond.notify()
            elif queue is not None:
                del self._queues[key]

    def _run(self) -> None:
        if self.init is not None:
            try:
                self.init()
            except Exception:  # a thread that died here would leave its calls waiting forever
                log.exception("generator thread set-up failed; running without it")
        while (item := self._next_job()) is not None:
            key, job = item
            del item
            try:
                self._execute(job)
            finally:
                self._done(key)
            # Nothing of the job may outlive it here: its arguments (a session's state) and any
            # exception traceback would keep that session's GPU memory alive until the next call.
            del job

    def _execute(self, job: _Job) -> None:
        if job.cancelled.is_set():
            return
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            result, error = job.fn(*job.args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        if job.measure and error is None:
            wall = time.perf_counter() - started
            self.load.record(wall)
            self.cpu_share.append((time.thread_time() - cpu) / wall if wall > 0 else 0.0)
        if job.cancelled.is_set():
            return
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)
        except RuntimeError:  # the event loop is gone (shutdown)
            log.debug("dropped a result after the event loop closed")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _cancel(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.cancel()
