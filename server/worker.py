"""Runs generator calls on dedicated threads so the event loop never waits on the model.

The sessions of a GPU set share its generator and its worker. Each session's calls run one at a time
and in order (its state is not
thread-safe), and sessions take turns: the next call comes from the session that has waited longest,
so one busy session cannot starve the others — they are interleaved block by block. Urgent calls
(speech blocks, opening a session) go before routine ones (idle blocks): when the worker falls behind,
idle motion is what slows down first. Calls marked `measure` are timed into `block_times`, the
measured block time that admission control and the degrade policy read.

Blocks (`run_block`) of sessions sharing a generator that can batch (`Generator.max_batch` > 1) are
made in one `step_batch` call when they are ready together: the thread takes the next call as above,
then, in turn order, the next block of every other waiting session with the same urgency and an equal
`Generator.batch_key` (same size, steps, stream state: the generator says when batching pays), up to
`max_batch`. A batch never makes an urgent block wait for a routine one; each session still has one
call at a time, in order. The batch's time is shared evenly between its blocks in the load meter, and
each block gets its own result or error.

A session has one block in flight: its next block comes only after the event loop has taken the last
one's frames. So when the worker picks the next block, the session whose block just came back has not
queued its next one yet, and without waiting the sessions would alternate and never meet. The worker
therefore waits up to `batch_wait_s` for such a session, but only one that keeps the worker busy: one
whose next blocks have mostly come within `batch_wait_s` of its last ones coming back (the median of
the last five; a session ahead of real time, which makes its blocks just in time, is not waited for).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from liveavatar.generator import AudioWindow, Generator
from server.load import LoadMeter

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH_WAIT_S = 0.01
"""The longest a block waits for another session's next block to batch with. A session that keeps up
with the worker sends its next block a few milliseconds after the last came back (the event loop's
round trip); one batch of two 384*256 blocks saves ~45 ms of 4 forwards (bench/batching.py on an H200),
so a wait this short pays even when the partner comes late."""


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
    batch: Generator | None = None
    """Set for a block (`run_block`): `fn` is this generator's `step`, args (state, window)."""


class GpuWorker:
    """A small pool of generator threads with per-session FIFO queues and round-robin turns."""

    def __init__(
        self,
        threads: int = 1,
        max_pending_per_session: int = 4,
        name: str = "generator",
        init: Callable[[], None] | None = None,
        batch_wait_s: float = BATCH_WAIT_S,
    ) -> None:
        """`init()` runs first on each thread (a GPU set's worker makes its GPU the thread's device);
        `batch_wait_s`: how long a block may wait for another session's to batch with (module docstring)."""
        self.init = init
        self.batch_wait_s = batch_wait_s
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
        self.batches = 0
        """`step_batch` calls that made blocks of several sessions."""
        self.batched_blocks = 0
        """Blocks made in those calls."""
        self._returned: dict[str, tuple[float, Generator]] = {}
        """Per session: when its last block came back (monotonic) and from which generator."""
        self._gaps: dict[str, deque[float]] = {}
        """Per session: the last times from a block coming back to its next block, seconds (their median
        says whether the session keeps the worker busy: one slow round trip of the event loop must not)."""
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
        return await self._submit(key, _Job(fn, args, *self._future(), urgent, measure))

    async def run_block(
        self, key: str, generator: Generator, state: Any, window: AudioWindow, urgent: bool = True
    ) -> np.ndarray:
        """`generator.step(state, window)` in `key`'s turn, measured; made together with other sessions'
        ready blocks when the generator batches them (module docstring)."""
        job = _Job(generator.step, (state, window), *self._future(), urgent, True, batch=generator)
        result: np.ndarray = await self._submit(key, job)
        return result

    @staticmethod
    def _future() -> tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        return loop, loop.create_future()

    async def _submit(self, key: str, job: _Job) -> Any:
        with self._cond:
            if self._closed:
                raise RuntimeError("worker is closed")
            queue = self._queues.setdefault(key, deque())
            if len(queue) >= self.max_pending:
                raise WorkerBusy(f"session {key} has {len(queue)} generator calls waiting")
            queue.append(job)
            if job.batch is not None and key in self._returned:
                self._gaps.setdefault(key, deque(maxlen=5)).append(time.monotonic() - self._returned[key][0])
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
            self._returned.pop(key, None)
            self._gaps.pop(key, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def _next_jobs(self) -> list[tuple[str, _Job]] | None:
        """The next call (urgent first, else the longest waiting session's), and the blocks that join it,
        after waiting briefly for a block expected to join (module docstring)."""
        with self._cond:
            while True:
                while not self._turns and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                key = next((k for k in self._turns if self._queues[k][0].urgent), self._turns[0])
                partners = self._partners(key)
                wait = self._expected_within(key, partners)
                if wait <= 0:
                    break
                self._cond.wait(wait)  # woken by any new call; then everything is judged again
            taken = [key, *partners]
            jobs = []
            for k in taken:
                self._turns.remove(k)
                jobs.append((k, self._queues[k].popleft()))
                self._busy.add(k)
            return jobs

    def _expected_within(self, key: str, partners: list[str]) -> float:
        """Seconds worth waiting for another session's next block to join `key`'s (0: none). Expected:
        a session with no call queued or running whose last block, from the same batching generator,
        came back less than `batch_wait_s` ago and whose next blocks usually come within that."""
        job = self._queues[key][0]
        generator = job.batch
        if generator is None or len(partners) + 1 >= generator.max_batch or _batch_key(generator, job) is None:
            return 0.0
        now, longest = time.monotonic(), 0.0
        for other, (returned, source) in self._returned.items():
            if other == key or other in self._busy or self._queues.get(other) or source is not generator:
                continue
            gaps = self._gaps.get(other)
            if not gaps or statistics.median(gaps) < self.batch_wait_s:
                longest = max(longest, returned + self.batch_wait_s - now)
        return longest

    def _partners(self, key: str) -> list[str]:
        """Sessions (in turn order) whose next call is a block that can join `key`'s in one `step_batch`:
        same generator and urgency, equal batch key. Under the lock; no session here has a call running,
        so their states hold still."""
        job = self._queues[key][0]
        generator = job.batch
        if generator is None or generator.max_batch < 2 or job.cancelled.is_set():
            return []
        wanted = _batch_key(generator, job)
        if wanted is None:
            return []
        found: list[str] = []
        for other in self._turns:
            if len(found) + 1 >= generator.max_batch:
                break
            head = self._queues[other][0]
            if other == key or head.batch is not generator or head.urgent != job.urgent or head.cancelled.is_set():
                continue
            if _batch_key(generator, head) == wanted:
                found.append(other)
        return found

    def _done(self, key: str, generator: Generator | None = None) -> None:
        """`key`'s call finished; `generator`: it was a block of this generator (`run_block`)."""
        with self._cond:
            self._busy.discard(key)
            if generator is not None and generator.max_batch > 1:
                self._returned[key] = (time.monotonic(), generator)
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
        while (jobs := self._next_jobs()) is not None:
            keys = [(key, job.batch, job.cancelled) for key, job in jobs]
            try:
                if len(jobs) == 1:
                    self._execute(jobs[0][1])
                else:
                    self._execute_batch([job for _, job in jobs])
            finally:
                for key, generator, cancelled in keys:  # a session closed meanwhile is not waited for again
                    self._done(key, None if cancelled.is_set() else generator)
            # Nothing of the jobs may outlive them here (no loop variable either): their arguments
            # (sessions' states) and any exception traceback would keep those sessions' GPU memory
            # alive until the next call.
            del jobs

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
        self._deliver(job, result, error)

    def _execute_batch(self, jobs: list[_Job]) -> None:
        """Blocks of several sessions in one `step_batch` call (cancelled ones left out); each job gets
        its own frames or error, and a measured share of the call's time."""
        live = [job for job in jobs if not job.cancelled.is_set()]
        if len(live) < 2:
            for job in live:
                self._execute(job)
            return
        generator = live[0].batch
        assert generator is not None  # only blocks are batched
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            results: list[Any] = list(generator.step_batch([job.args for job in live]))
            if len(results) != len(live):
                raise RuntimeError(f"step_batch returned {len(results)} results for {len(live)} blocks")
        except BaseException as exc:  # the call itself failed: every block of it did
            results = [exc] * len(live)
        wall = time.perf_counter() - started
        self.batches += 1
        self.batched_blocks += len(live)
        self.cpu_share.append((time.thread_time() - cpu) / wall if wall > 0 else 0.0)
        for job, result in zip(live, results, strict=True):
            error = result if isinstance(result, BaseException) else None
            if error is None:
                self.load.record(wall / len(live))
            self._deliver(job, None if error is not None else result, error)
        del results

    @staticmethod
    def _deliver(job: _Job, result: Any, error: BaseException | None) -> None:
        if job.cancelled.is_set():
            return
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)
        except RuntimeError:  # the event loop is gone (shutdown)
            log.debug("dropped a result after the event loop closed")


def _batch_key(generator: Generator, job: _Job) -> Hashable | None:
    """The block's batch key, None (alone) if the generator cannot say."""
    try:
        return generator.batch_key(*job.args)
    except Exception:  # a broken state: its block runs alone and reports its own error
        log.debug("no batch key for a block", exc_info=True)
        return None


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
