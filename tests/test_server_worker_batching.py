"""The worker makes ready blocks of sessions that can share a forward in one `step_batch` call: only
blocks with equal batch keys and urgency, each session's calls in order, failures per session; and
end to end with the tiny model, two streams on one worker get their frames as alone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from test_stream_batched import SIZE, SPECS, LatentDecoder, latents_of, window

from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator
from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size
from server.worker import GpuWorker


class Batcher(Generator):
    """Records what the worker asks: `step` of one block or `step_batch` of several. A state is a dict
    with its session's name, its batch key and (optionally) an error its blocks fail with."""

    name = "batcher"
    max_batch = 2

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.calls: list[list[tuple[str, int]]] = []
        self.lock = threading.Lock()

    def open(self, spec: AvatarSpec, size: Size) -> Any:
        raise NotImplementedError

    def switch(self, state: Any, spec: AvatarSpec) -> None:
        raise NotImplementedError

    def batch_key(self, state: Any, window: AudioWindow) -> Hashable | None:
        return state["key"]

    def step(self, state: Any, window: AudioWindow) -> np.ndarray:
        return self.step_batch([(state, window)])[0]  # type: ignore[return-value]

    def step_batch(self, items: Sequence[tuple[Any, AudioWindow]]) -> list[np.ndarray | Exception]:
        with self.lock:
            self.calls.append([(state["name"], w.index) for state, w in items])
        time.sleep(self.seconds)
        if any(state.get("raise") for state, _ in items):
            raise RuntimeError("the whole call failed")
        return [
            state["error"] if state.get("error") else np.full(1, w.index + 100 * ord(state["name"][0]))
            for state, w in items
        ]


def block(index: int) -> AudioWindow:
    return AudioWindow(np.zeros(4, np.float32), index=index)


@pytest.fixture
def worker():
    workers: list[GpuWorker] = []

    def make(threads: int = 1) -> GpuWorker:
        w = GpuWorker(threads)
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.close()


async def stream(w: GpuWorker, gen: Generator, state: dict[str, Any], blocks: int, urgent: bool = True) -> list[int]:
    """A session's generation loop: one block at a time, the next after the last came back."""
    out = []
    for i in range(blocks):
        frames = await w.run_block(state["name"], gen, state, block(i), urgent=urgent)
        out.append(int(frames[0]))
    return out


async def test_ready_blocks_with_equal_keys_are_made_together_and_each_session_keeps_its_order(worker) -> None:
    w, gen = worker(1), Batcher()
    a, b, c = ({"name": n, "key": k} for n, k in (("a", "k"), ("b", "k"), ("c", "other")))
    results = await asyncio.gather(stream(w, gen, a, 5), stream(w, gen, b, 5), stream(w, gen, c, 5))
    for state, got in zip((a, b, c), results, strict=True):
        assert got == [i + 100 * ord(state["name"]) for i in range(5)], "each block's own result, in order"
    batches = [call for call in gen.calls if len(call) > 1]
    assert batches and all({name for name, _ in call} == {"a", "b"} for call in batches), gen.calls
    assert all(len(call) <= gen.max_batch for call in gen.calls)
    for name in "abc":
        indices = [i for call in gen.calls for n, i in call if n == name]
        assert indices == list(range(5)), (name, gen.calls)
    assert w.batched_blocks == 2 * len(batches) and w.batches == len(batches)
    one_block = w.load.block_seconds()
    assert one_block is not None and one_block < 1.5 * gen.seconds, "a batch's time is shared by its blocks"


async def test_an_urgent_block_is_never_made_together_with_a_routine_one(worker) -> None:
    w, gen = worker(1), Batcher()
    busy = {"name": "busy", "key": None}
    speech, idle = {"name": "speech", "key": "k"}, {"name": "idle", "key": "k"}
    first = asyncio.create_task(w.run_block("busy", gen, busy, block(0)))
    await asyncio.sleep(0.005)  # busy runs; the other two queue behind it
    idle2 = idle | {"name": "idle2"}
    await asyncio.gather(
        first, stream(w, gen, idle, 1, urgent=False), stream(w, gen, speech, 1), stream(w, gen, idle2, 1, urgent=False)
    )
    assert gen.calls[1] == [("speech", 0)], gen.calls
    assert sorted(gen.calls[2]) == [("idle", 0), ("idle2", 0)], "routine blocks still batch with each other"


async def test_one_sessions_error_is_its_own_and_a_failed_call_fails_each_of_its_blocks(worker) -> None:
    w, gen = worker(1), Batcher()
    hold = asyncio.create_task(w.run_block("x", gen, {"name": "x", "key": None}, block(0)))
    await asyncio.sleep(0.005)
    bad = {"name": "bad", "key": "k", "error": ValueError("bad audio")}
    good = {"name": "good", "key": "k"}
    outcome = await asyncio.gather(stream(w, gen, bad, 1), stream(w, gen, good, 1), hold, return_exceptions=True)
    assert isinstance(outcome[0], ValueError) and outcome[1] == [ord("g") * 100]
    assert [("bad", 0), ("good", 0)] in gen.calls

    hold = asyncio.create_task(w.run_block("x", gen, {"name": "x", "key": None}, block(1)))
    await asyncio.sleep(0.005)
    one, two = {"name": "one", "key": "k", "raise": True}, {"name": "two", "key": "k"}
    outcome = await asyncio.gather(stream(w, gen, one, 1), stream(w, gen, two, 1), hold, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and "whole call" in str(o) for o in outcome[:2]), outcome
    assert await stream(w, gen, two, 1) == [ord("t") * 100], "the worker goes on"


async def test_a_cancelled_block_is_left_out_of_the_batch(worker) -> None:
    w, gen = worker(1), Batcher()
    hold = asyncio.create_task(w.run_block("x", gen, {"name": "x", "key": None}, block(0)))
    await asyncio.sleep(0.005)
    gone = asyncio.create_task(w.run_block("gone", gen, {"name": "gone", "key": "k"}, block(0)))
    stay = asyncio.create_task(w.run_block("stay", gen, {"name": "stay", "key": "k"}, block(0)))
    await asyncio.sleep(0.001)
    gone.cancel()
    await asyncio.gather(hold, stay)
    assert [("stay", 0)] in gen.calls and all(("gone", 0) not in call for call in gen.calls), gen.calls


async def test_two_tiny_model_streams_on_one_worker_are_batched_and_get_their_frames_alone(
    tiny_liveavatar: Any, one_torch_thread: None
) -> None:
    gen = LiveAvatarGenerator(tiny_liveavatar.pipeline, motion_frames=5, batch_sessions=2, batch_frame_tokens=64)
    gen.decoder = LatentDecoder()  # type: ignore[assignment]
    w = GpuWorker(1)
    try:
        alone = [await w.run("r", gen.open, spec, SIZE) for spec in SPECS]
        for s, state in enumerate(alone):
            for i in range(11):
                await w.run_block("r", gen, state, window(s, i))
        pair = [await w.run(f"s{s}", gen.open, spec, SIZE) for s, spec in enumerate(SPECS)]

        async def live(s: int, blocks: int) -> None:
            for i in range(blocks):
                await w.run_block(f"s{s}", gen, pair[s], window(s, i))

        await asyncio.gather(live(0, 9), live(1, 9))
        assert w.batched_blocks >= 2, "both were steady and ready together: at least one batch"
        await w.run("s0", gen.close, pair[0])  # one leaves; the other carries on alone
        assert not gen.dit.batch_graphs and pair[1].stream.graph_nbytes() == 0
        for i in range(9, 11):
            await w.run_block("s1", gen, pair[1], window(1, i))
    finally:
        w.close()
    for s in range(2):
        got, want = latents_of(gen, pair[s]), latents_of(gen, alone[s])
        assert len(got) == (9 if s == 0 else 11)
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=False))
    assert any(p.batch == 2 for p in pair[1].profile)
