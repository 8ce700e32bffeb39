"""Runs generator calls on dedicated threads so the event loop never waits on the model.

Sessions share one generator. Each session's calls run one at a time and in order (its state is not
thread-safe), and sessions take turns: the next call comes from the session that has waited longest,
so one busy session cannot starve the others — they are interleaved block by block.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerBusy(RuntimeError):
    """A session queued more calls than allowed: its producer must wait for results first."""


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    cancelled: threading.Event = field(default_factory=threading.Event)


class GpuWorker:
    """A small pool of generator threads with per-session FIFO queues and round-robin turns."""

    def __init__(self, threads: int = 1, max_pending_per_session: int = 4, name: str = "generator") -> None:
        self.max_pending = max_pending_per_session
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

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on a worker thread in `key`'s turn; awaits the result (or its exception)."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, args, loop, loop.create_future())
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
            key = self._turns.popleft()
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
        while (item := self._next_job()) is not None:
            key, job = item
            try:
                if job.cancelled.is_set():
                    continue
                try:
                    result, error = job.fn(*job.args), None
                except BaseException as exc:  # handed to the awaiting coroutine
                    result, error = None, exc
                if not job.cancelled.is_set():
                    job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # the event loop is gone (shutdown)
                log.debug("dropped a result after the event loop closed")
            finally:
                self._done(key)


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
