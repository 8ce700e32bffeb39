"""Every session ends, always: right after a push, after an internal error with audio queued, when a
background task fails, and when the server is told to stop. Degenerate pushed audio is harmless."""

from __future__ import annotations

import asyncio
import base64
import signal
import urllib.request

import numpy as np
import pytest
from server_peer import PeerClient

from server.protocol import PUSH_RATES

TONE = (np.sin(np.arange(48_000) / 5) * 6000).astype("<i2")  # 3 s at 16 kHz


def ws_url(app) -> str:
    return app.url.replace("http", "ws") + "ws"


async def push_session(url: str) -> PeerClient:
    client = await PeerClient(url, keep_video=False).connect()
    await client.start(mode="push")
    await client.wait_frames(3)
    return client


async def sessions_active(app) -> str:
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(app.url + "metrics").read().decode())
    return next(line for line in text.splitlines() if line.startswith("liveavatar_sessions_active "))


async def until_removed(app, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if len(app.registry) == 0:
            return
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_stop_right_after_a_push_closes_and_removes_the_session(start_server, binary) -> None:
    app = await start_server()
    client = await push_session(ws_url(app))
    try:
        for _ in range(3):  # each round: push then stop at once, then a new session on the same socket
            await client.send(TONE.tobytes() if binary else client.push_b64(TONE))
            await client.send({"type": "stop"})
            await client.wait_for("closed", timeout=5, session=client.session)
            await client.send({"type": "ping"})
            await client.wait_for("pong", timeout=5)
            await until_removed(app)
            assert len(app.registry) == 0
            assert await sessions_active(app) == "liveavatar_sessions_active 0"
            await client.pc.close()
            await client.start(mode="push")
    finally:
        await client.close()


async def test_an_internal_error_during_a_push_with_audio_queued_removes_the_session(start_server, monkeypatch) -> None:
    from server.feed import AudioFeed

    app = await start_server()
    client = await push_session(ws_url(app))
    ingest = AudioFeed.ingest

    def ingest_then_fail(self, produced, now) -> None:
        ingest(self, produced, now)  # the audio is queued and the generation loop woken ...
        raise RuntimeError("injected failure after queueing")  # ... then the request fails

    monkeypatch.setattr(AudioFeed, "ingest", ingest_then_fail)
    try:
        await client.send(client.push_b64(TONE))
        error = await client.wait_for("error", timeout=5)
        await client.wait_for("closed", timeout=5, session=client.session)
        await until_removed(app)
    finally:
        await client.close()
    assert error["code"] == "internal"
    assert len(app.registry) == 0
    assert await sessions_active(app) == "liveavatar_sessions_active 0"


async def test_a_failing_mic_reader_closes_its_session_with_internal(start_server, monkeypatch) -> None:
    import server.webrtc

    class BrokenResampler:
        def __init__(self, rate: int) -> None:
            pass

        def resample(self, frame):
            raise RuntimeError("injected mic failure")

    monkeypatch.setattr(server.webrtc, "PcmResampler", BrokenResampler)
    app = await start_server()
    client = await PeerClient(ws_url(app), keep_video=False).connect()
    try:
        await client.start(mode="mic")
        error = await client.wait_for("error", timeout=10)
        await client.wait_for("closed", timeout=5, session=client.session)
        await until_removed(app)
    finally:
        await client.close()
    assert error["code"] == "internal" and "injected mic failure" in error["message"]
    assert len(app.registry) == 0


async def test_a_task_that_ignores_cancellation_does_not_hold_close_forever(start_server) -> None:
    app = await start_server()
    client = await push_session(ws_url(app))
    session = app.registry.get(client.session)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:  # swallowed, as wait_for could on 3.11
                continue

    session.stream.tasks.spawn(stubborn(), "stubborn")
    session.stream.tasks.timeout_s = 0.5
    try:
        await asyncio.wait_for(session.close("test"), 5)
        await client.wait_for("closed", timeout=5, session=client.session)
    finally:
        release.set()
        await client.close()
    assert len(app.registry) == 0


@pytest.mark.parametrize("rate", PUSH_RATES)
async def test_degenerate_pushes_are_a_no_op_or_bad_audio_at_every_rate(start_server, rate) -> None:
    app = await start_server()
    client = await PeerClient(ws_url(app), keep_video=False).connect()
    try:
        await client.start(mode="push", sample_rate=rate)
        chunks = [b"", b"\1\0", b"\1\0\2\0\3\0", b"\1", b"\1\0\2"]
        for chunk in chunks:
            await client.send(chunk)  # binary, at the offer's rate
            await client.send({"type": "push", "audio": base64.b64encode(chunk).decode(), "sample_rate": rate})
        await client.send({"type": "push_end"})
        await client.send({"type": "ping"})
        await client.wait_for("pong", timeout=5)
        await client.wait_for("finished", timeout=5)
    finally:
        await client.close()
    codes = [m["code"] for m in client.messages if m["type"] == "error"]
    assert codes == ["bad_audio"] * 4, codes  # the odd byte counts, binary and JSON; nothing else
    assert "closed" not in client.types()


@pytest.mark.timeout(120)
async def test_sigterm_ends_every_session_and_exits_within_5_s(server_process) -> None:
    server = server_process("--backend", "preview")
    url = server.url.replace("http", "ws") + "ws"
    stuck = await push_session(url)  # push then stop at once: a session the old server never ended
    await stuck.send(stuck.push_b64(TONE))
    await stuck.send({"type": "stop"})
    speaking = await push_session(url)
    try:
        await speaking.send(speaking.push_b64(np.tile(TONE, 3)))
        await speaking.wait_for("started", timeout=10)
        server.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.process.wait, 5)  # TimeoutExpired fails the test
        await speaking.wait_for("closed", timeout=2, session=speaking.session)
    finally:
        await speaking.close()
        await stuck.close()
    assert code == 0
