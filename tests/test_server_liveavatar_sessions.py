"""Several sessions on one tiny liveavatar backend (CPU): isolation of their outputs, admission
control, memory returned when a peer vanishes, and a failing block that ends only its own session."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import numpy as np
import pytest
import torch
from server_peer import PeerClient, offer_reply

from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size
from server.worker import GpuWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = Size(128, 128)


def portrait(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((96, 80, 3)) * 255).astype(np.uint8)


def window(index: int) -> AudioWindow:
    samples = (np.random.default_rng(50 + index).standard_normal(7680) * 0.1).astype(np.float32)
    return AudioWindow(samples=samples, speech=True, index=index)


async def stream(worker: GpuWorker, gen: Any, key: str, spec: AvatarSpec, blocks: int) -> list[np.ndarray]:
    state = await worker.run(key, gen.open, spec, SIZE)
    frames = [await worker.run(key, gen.step, state, window(i), measure=True) for i in range(blocks)]
    await worker.run(key, gen.close, state)
    return frames


async def test_two_interleaved_sessions_make_the_same_frames_as_each_alone(tiny_liveavatar) -> None:
    a = AvatarSpec(image=portrait(0), prompt="a man speaks", seed=3)
    b = AvatarSpec(image=portrait(1), prompt="a woman talks", seed=5)
    worker = GpuWorker(1)
    try:
        alone = await stream(worker, tiny_liveavatar, "a", a, 2)
        together, other = await asyncio.gather(
            stream(worker, tiny_liveavatar, "a2", a, 2), stream(worker, tiny_liveavatar, "b", b, 2)
        )
    finally:
        worker.close()
    for x, y in zip(alone, together, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(alone[1], other[1])
    assert worker.load.block_seconds() is not None  # the worker measured its block time


async def test_a_vanished_peer_frees_its_state_and_its_place_goes_to_the_next_one(start_server) -> None:
    app = await start_server(
        backend="liveavatar", random_weights="tiny", motion_frames=5, size="128*128", realtime_capacity=0
    )
    ws = app.url.replace("http", "ws") + "ws"
    first, second = await PeerClient(ws).connect(), await PeerClient(ws).connect()
    assert first.config["model"]["weights"] == "random:tiny"
    try:
        await first.start(mode="push")
        session = next(iter(app.registry))
        while session.stream.blocks < 1:  # the rings are allocated by the first block
            await asyncio.sleep(0.1)
        # Room for one session, not two (the estimate includes the VAE cache once a block was made).
        app.admission.budget = int(1.5 * app.admission.estimate(SIZE))
        state = weakref.ref(session.stream._state)
        ring = weakref.ref(session.stream._state.stream.branches[0].rings[0].k[0])

        busy = await asyncio.wait_for(offer_reply(second), 10)
        assert busy["type"] == "error" and busy["code"] == "busy" and busy["retryAfterS"] > 0, busy

        first.ws.transport.abort()  # the peer vanishes: no stop, no close handshake
        while len(app.registry):
            await asyncio.sleep(0.1)
        del session
        gc.collect()
        assert state() is None and ring() is None
        assert app.admission.sessions == 0

        await second.start(mode="push")  # the freed place is admitted
        await second.wait_frames(5, timeout=30)
    finally:
        await first.close()
        await second.close()


class FailingGenerator(Generator):
    """The tiny backend, except that a session whose prompt is "fail" runs out of GPU memory on its
    second block (an injected fault standing in for CUDA OOM), and every poster is the wrong shape
    (cosmetic: sessions must stream anyway, starting on black)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.default_size = inner, inner.name, inner.default_size

    def open(self, spec: AvatarSpec, size: Size) -> Any:
        return self.inner.open(spec, size)

    def poster(self, state: Any) -> np.ndarray:
        return np.zeros((2, 2, 3), np.uint8)

    def step(self, state: Any, window: AudioWindow) -> np.ndarray:
        if state.spec.prompt == "fail" and state.blocks == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.inner.step(state, window)

    def switch(self, state: Any, spec: AvatarSpec) -> None:
        self.inner.switch(state, spec)

    def close(self, state: Any) -> None:
        self.inner.close(state)


async def test_an_out_of_memory_block_ends_only_its_own_session(start_server, tiny_liveavatar) -> None:
    app = await start_server(generator=FailingGenerator(tiny_liveavatar), size="128*128", realtime_capacity=0)
    ws = app.url.replace("http", "ws") + "ws"
    bad, good = await PeerClient(ws).connect(), await PeerClient(ws).connect()
    try:
        await good.start(mode="push", prompt="a man speaks")  # opens despite its unusable poster
        await bad.start(mode="push", prompt="fail")
        error = await bad.wait_for("error", timeout=90)
        await bad.wait_for("closed", timeout=10)
        assert error["code"] == "out_of_memory" and "out of memory" in error["message"]
        survivor = app.registry.get(good.session)
        assert survivor is not None and len(app.registry) == 1
        blocks = survivor.stream.blocks
        while survivor.stream.blocks < blocks + 1:  # it keeps generating after the failure
            await asyncio.sleep(0.1)
        await good.wait_frames(10, timeout=10)
        assert not [m for m in good.messages if m["type"] in ("error", "closed")]
    finally:
        await bad.close()
        await good.close()
