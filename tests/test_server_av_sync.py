"""Lip sync by test pattern: beeps go in, a generator double flashes the frames that carry them, and the
receiver checks that each flash and its beep come out at the same moment.

Both are timed on the server's wall clock through RTCP sender reports (see server_peer.py), which is
how a browser lines up the two tracks. This checks content, not just timestamps: windowing, the 16 ->
48 kHz resampler, the clock's slots, RTP and the encoders all have to agree.
"""

from __future__ import annotations

import asyncio

import numpy as np
from server_peer import PeerClient

from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size

BEEP_EVERY = 13 * 640  # 0.52 s: beeps land at different places inside the 0.48 s blocks
BEEP_LEN = 2 * 640  # two frames long


class FlashGenerator(Generator):
    """Test double: a frame is white when its slice of the window's audio is loud, black otherwise."""

    name = "flash-test"

    def open(self, spec: AvatarSpec, size: Size) -> Size:
        return size

    def step(self, state: Size, window: AudioWindow) -> np.ndarray:
        per = len(window.samples) // self.frames_per_block
        frames = np.zeros((self.frames_per_block, state.height, state.width, 3), np.uint8)
        for i in range(self.frames_per_block):
            if np.abs(window.samples[i * per : (i + 1) * per]).max() > 0.2:
                frames[i] = 255
        return frames

    def switch(self, state: Size, spec: AvatarSpec) -> None:
        pass


def beeps(count: int) -> np.ndarray:
    out = np.zeros(BEEP_EVERY * (count + 1), np.float32)
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(BEEP_LEN) / 16_000)
    for k in range(count):
        out[BEEP_EVERY * (k + 1) : BEEP_EVERY * (k + 1) + BEEP_LEN] = tone
    return (out * 32767).astype(np.int16)


def onsets(active: np.ndarray, min_gap: int) -> list[int]:
    """Indices where `active` turns on after at least `min_gap` inactive entries."""
    idx = np.flatnonzero(active)
    return [int(i) for k, i in enumerate(idx) if k == 0 or i - idx[k - 1] > min_gap]


async def test_each_beep_and_its_flash_come_out_within_40_ms(start_server) -> None:
    app = await start_server(generator=FlashGenerator(), size="128*128")
    client = await PeerClient(app.url.replace("http", "ws") + "ws", thumb=32).connect()
    try:
        await client.start(mode="push")
        await client.wait_frames(10)
        await client.send(client.push_b64(beeps(8)))
        await client.send({"type": "push_end"})
        await client.wait_for("finished", timeout=15)
        await asyncio.sleep(1.5)  # the last frames, and a sender report after them
    finally:
        await client.close()

    got = client.got
    audio, pts0 = got.audio_signal()
    beep_t = [got.sender_time("audio", pts0 + i) for i in onsets(np.abs(audio) > 8000, 48_000 // 10)]
    flashes = np.array([img.mean() > 128 for _, _, img in got.video])
    flash_t = [got.sender_time("video", got.video[i][1]) for i in onsets(flashes, 3)]
    assert len(beep_t) == 8 and len(flash_t) == 8, (len(beep_t), len(flash_t))
    offsets = [(v - a) * 1000 for v, a in zip(flash_t, beep_t, strict=True)]
    print("A/V offset per beep (ms, + = video later):", " ".join(f"{o:+.1f}" for o in offsets))
    assert max(abs(o) for o in offsets) <= 40
