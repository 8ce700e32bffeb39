"""What one preview session costs the server: `liveavatar serve` runs as its own process, one mic
session streams into it, and the process's CPU time is read from /proc. The figure includes the
animation, VP8 and Opus encoding, SRTP and the event loop: everything a session adds."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest
from server_peer import ArrayAudioTrack, PeerClient, fps_by_arrival

from liveavatar.media_io import decode_audio

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads CPU time from /proc")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_preview_session_uses_at_most_one_core_of_the_server(server_process, assets) -> None:
    server = server_process("--log-level", "warning")
    speech = decode_audio(assets / "speech_en_48k.wav", rate=48_000).samples
    client = await PeerClient(server.url.replace("http", "ws") + "ws", keep_video=False).connect()
    try:
        await client.start(mode="mic", mic=ArrayAudioTrack((speech * 32767).astype(np.int16)))
        await client.wait_frames(25)
        await asyncio.sleep(1.0)
        used, started = cpu_seconds(server.process.pid), time.monotonic()
        await asyncio.sleep(6.0)
        cores = (cpu_seconds(server.process.pid) - used) / (time.monotonic() - started)
        stats = await client.wait_for("stats", after=len(client.messages) - 1, timeout=3)
    finally:
        await client.close()
    fps = fps_by_arrival([t for t, _, _ in client.got.video], skip_s=2.0)
    print(f"one preview session: server process {cores:.2f} cores, {fps:.1f} fps received, lag {stats['lagMs']} ms")
    assert fps >= 24
    assert cores <= 1.0
