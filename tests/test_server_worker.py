"""The generator worker: off the event loop, one call at a time per session, sessions take turns."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.worker import GpuWorker, WorkerBusy


@pytest.fixture
def worker():
    workers: list[GpuWorker] = []

    def make(threads: int = 1, **kw) -> GpuWorker:
        w = GpuWorker(threads, **kw)
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.close()


async def test_a_waiting_session_goes_before_a_busy_sessions_backlog(worker) -> None:
    w = worker(1)
    order: list[str] = []

    def job(tag: str) -> None:
        time.sleep(0.02)
        order.append(tag)

    flood = [asyncio.create_task(w.run("a", job, f"a{i}")) for i in range(4)]
    await asyncio.sleep(0.005)  # a0 is running, a1..a3 wait
    await asyncio.gather(w.run("b", job, "b0"), *flood)
    assert order.index("b0") <= 2, order  # interleaved, not after a's whole backlog


async def test_calls_of_one_session_never_overlap_even_with_many_threads(worker) -> None:
    w = worker(3)
    active, overlaps, lock = [0], [0], threading.Lock()

    def job() -> None:
        with lock:
            active[0] += 1
            overlaps[0] = max(overlaps[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1

    await asyncio.gather(*(w.run("s", job) for _ in range(4)))
    assert overlaps[0] == 1


async def test_different_sessions_run_in_parallel_on_several_threads(worker) -> None:
    w = worker(2)
    start = time.monotonic()
    await asyncio.gather(w.run("a", time.sleep, 0.2), w.run("b", time.sleep, 0.2))
    assert time.monotonic() - start < 0.35


async def test_the_event_loop_keeps_running_during_a_long_call(worker) -> None:
    w = worker(1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    await w.run("s", time.sleep, 0.3)
    t.cancel()
    assert ticks >= 15


async def test_exceptions_reach_the_caller(worker) -> None:
    w = worker(1)

    def boom() -> None:
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        await w.run("s", boom)


async def test_a_session_cannot_queue_without_bound(worker) -> None:
    w = worker(1, max_pending_per_session=2)
    running = threading.Event()

    def first() -> None:
        running.set()
        time.sleep(0.1)

    held = [asyncio.create_task(w.run("s", first))]
    await asyncio.to_thread(running.wait, 5)
    held += [asyncio.create_task(w.run("s", time.sleep, 0.01)) for _ in range(2)]
    await asyncio.sleep(0)  # one running, two waiting
    with pytest.raises(WorkerBusy):
        await w.run("s", time.sleep, 0)
    await asyncio.gather(*held)


async def test_forget_cancels_a_closed_sessions_waiting_calls(worker) -> None:
    w = worker(1)
    started = threading.Event()

    def first() -> None:
        started.set()
        time.sleep(0.1)

    running = asyncio.create_task(w.run("s", first))
    await asyncio.to_thread(started.wait, 5)
    waiting = asyncio.create_task(w.run("s", time.sleep, 0.1))
    await asyncio.sleep(0)
    w.forget("s")
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await running
    assert w.pending == 0
