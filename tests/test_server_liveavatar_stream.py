"""The diffusion backend live in the server, on CPU with tiny random weights: an aiortc client on
loopback gets frames continuously, in sync with the sound, through a `switch` mid-stream.

The tiny model takes seconds per 0.48 s block on CPU, so this also runs the server far behind real
time: the clock must keep both tracks going (bouncing the last idle block, holding after speech), and
every generated frame must still meet its own sound. To see which frame carries which sound, a thin
wrapper paints a corner of each generated frame white when its slice of audio is loud (a beep).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import cv2
import numpy as np
import pytest
from server_peer import PeerClient
from test_server_av_sync import BEEP_LEN, onsets

from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BLOCK = 7680
BEEP_AT = (640, 3200, 5760)
"""Beep k starts this far into pushed block k: different places in the block, none across a boundary
(the clock holds between slow blocks, which would split a beep in two)."""


class MarkedGenerator(Generator):
    """The tiny liveavatar backend, with a white corner on frames whose audio is loud."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.default_size = inner.default_size

    def open(self, spec: AvatarSpec, size: Size) -> Any:
        return self.inner.open(spec, size)

    def step(self, state: Any, window: AudioWindow) -> np.ndarray:
        frames = self.inner.step(state, window).copy()
        per = len(window.samples) // self.frames_per_block
        for i in range(self.frames_per_block):
            loud = np.abs(window.samples[i * per : (i + 1) * per]).max() > 0.2
            frames[i, :24, :24] = 255 if loud else 0
        return frames

    def switch(self, state: Any, spec: AvatarSpec) -> None:
        self.inner.switch(state, spec)

    def close(self, state: Any) -> None:
        self.inner.close(state)


def beeps() -> np.ndarray:
    out = np.zeros(BLOCK * len(BEEP_AT), np.float32)
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(BEEP_LEN) / 16_000)
    for k, at in enumerate(BEEP_AT):
        out[BLOCK * k + at : BLOCK * k + at + BEEP_LEN] = tone
    return (out * 32767).astype(np.int16)


def png_b64(seed: int) -> str:
    image = (np.random.default_rng(seed).random((96, 96, 3)) * 255).astype(np.uint8)
    return base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()


async def test_a_tiny_liveavatar_session_streams_in_sync_and_keeps_flowing_through_a_switch(
    start_server, tiny_liveavatar
) -> None:
    gen = MarkedGenerator(tiny_liveavatar)
    app = await start_server(generator=gen, size="128*128", realtime_capacity=0)
    client = await PeerClient(app.url.replace("http", "ws") + "ws", thumb=128).connect()
    try:
        await client.start(mode="push", prompt="a man speaks")
        await client.wait_frames(10, timeout=60)
        await client.send(client.push_b64(beeps()))
        await client.send({"type": "push_end"})
        await client.send({"type": "switch", "portrait": png_b64(5), "prompt": "a woman talks"})
        switched = await client.wait_for("switched", timeout=60)
        await client.wait_for("finished", timeout=90)
        session = next(iter(app.registry))
        after = session.stream.blocks
        while session.stream.blocks < after + 1:  # a block made entirely with the new avatar
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # its frames, and a sender report after them
    finally:
        await client.close()

    arrivals = np.array([t for t, _, _ in client.got.video])
    gaps = np.diff(arrivals[arrivals > arrivals[0] + 1.0])
    print(f"{len(arrivals)} frames, largest gap {gaps.max() * 1000:.0f} ms, switched at block {switched['block']}")
    assert gaps.max() < 0.3  # frames kept coming while each block took seconds to make

    thumbs = [img for _, _, img in client.got.video]
    first_real = next(i for i, img in enumerate(thumbs) if img[40:].std() > 5)
    assert all(img[40:].std() > 5 for img in thumbs[first_real:])  # never a blank frame, seam included

    got = client.got
    audio, pts0 = got.audio_signal()
    beep_t = [got.sender_time("audio", pts0 + i) for i in onsets(np.abs(audio) > 8000, 48_000 // 10)]
    marked = np.array([img[:16, :16].mean() > 128 for img in thumbs])
    flash_t = [got.sender_time("video", got.video[i][1]) for i in onsets(marked, 3)]
    assert len(beep_t) == 3 and len(flash_t) == 3, (len(beep_t), len(flash_t))
    offsets = [(v - a) * 1000 for v, a in zip(flash_t, beep_t, strict=True)]
    print("A/V offset per beep (ms, + = video later):", " ".join(f"{o:+.1f}" for o in offsets))
    assert max(abs(o) for o in offsets) <= 40
