"""Server hardening: extra m-lines and unused tracks, pushes off the event loop, the outbox policy,
internal errors, odd HTTP requests, the connection cap and playback events for pushing apps."""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from server_peer import ArrayAudioTrack, PeerClient, raw_response

from server.connection import Connection
from server.session import Session

TOKEN = "s3cret-token-0123456789"


def ws_url(app) -> str:
    return app.url.replace("http", "ws") + "ws"


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def raw_status(app, request: str) -> int:
    """Status code of a hand-written HTTP request (for headers urllib cannot send)."""
    return int((await raw_response(app, request)).split()[1])


# ---- 1. offers: one audio and one video m-line; unused remote tracks are stopped ------------------


async def test_an_offer_with_two_audio_m_lines_is_refused(start_server) -> None:
    app = await start_server()
    client = await PeerClient(ws_url(app)).connect()
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        await client.send({"type": "offer", "sdp": pc.localDescription.sdp, "mode": "push"})
        error = await client.wait_for("error", timeout=5)
    finally:
        await pc.close()
        await client.close()
    assert error["code"] == "bad_sdp" and "2 audio m-lines" in error["message"]
    assert len(app.registry) == 0


async def test_a_camera_sent_with_the_mic_is_ignored_and_the_session_works(start_server) -> None:
    app = await start_server()
    client = await PeerClient(ws_url(app), keep_video=False).connect()
    client.pc = pc = RTCPeerConnection()
    try:
        pc.addTransceiver(ArrayAudioTrack(np.zeros(48_000 * 10, np.int16)), direction="sendrecv")
        pc.addTransceiver(VideoStreamTrack(), direction="sendrecv")  # the browser's camera
        pc.on("track", client._on_track)
        await pc.setLocalDescription(await pc.createOffer())
        await client.send({"type": "offer", "sdp": pc.localDescription.sdp, "mode": "mic"})
        answer = await client.wait_for("answer", timeout=20)
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        await client.wait_frames(10)
        session = app.registry.get(answer["session"])
        assert (
            session is not None
            and session.transport.mic_track is not None
            and session.transport.mic_track.kind == "audio"
        )
        assert session.transport.unused_tracks == 1
        video_rx = [t for t in session.transport.pc.getTransceivers() if t.kind == "video"]
        assert len(video_rx) == 1 and video_rx[0].receiver.track.readyState == "ended"
        assert video_rx[0].currentDirection == "sendonly"  # its receiver never decodes
        assert session.stream.feed.last_input is not None  # the mic is read
    finally:
        await client.close()
    assert "error" not in client.types()


# ---- 2. a large push runs off the event loop ------------------------------------------------------


async def test_a_large_push_does_not_stall_the_event_loop(start_server) -> None:
    app = await start_server()
    client = PeerClient(ws_url(app), keep_video=False)
    await client.connect()
    try:
        await client.start(mode="push", sample_rate=48_000)
        await client.wait_frames(3)
        session = app.registry.get(client.session)
        pcm = (np.sin(np.arange(48_000 * 80) / 5) * 6000).astype("<i2")  # 80 s at 48 kHz, 7.7 MB
        loop = asyncio.get_running_loop()
        worst = 0.0
        done = False

        async def ticker() -> None:
            nonlocal worst
            while not done:
                t = loop.time()
                await asyncio.sleep(0.005)
                worst = max(worst, loop.time() - t - 0.005)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        await client.send(pcm.tobytes())
        deadline = time.monotonic() + 10
        while not session.stream.feed.utterances and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        done = True
        await tick
        ((first, end),) = session.stream.feed.utterances[0].intervals
        assert abs(end - first - 80 * 16_000) < 1000
    finally:
        await client.close()
    print(f"large push: worst event-loop delay {worst * 1000:.0f} ms")
    assert worst < 0.06


# ---- 3. the outbox drops stats, never control messages --------------------------------------------


class FakeWs:
    remote_address = ("127.0.0.1", 1)

    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)


async def test_a_full_outbox_drops_the_oldest_stats_and_never_a_control_message() -> None:
    ws = FakeWs()
    conn = Connection(ws, limit=4)  # type: ignore[arg-type]
    for m in ({"type": "stats", "n": 1}, {"type": "answer"}, {"type": "stats", "n": 2}, {"type": "started"}):
        conn.post(m)
    conn.post({"type": "finished"})  # full: the oldest stats goes
    assert [m.get("n", m["type"]) for m in conn.outbox] == ["answer", 2, "started", "finished"]
    conn.post({"type": "stats", "n": 3})  # a new stats replaces the queued one
    assert [m.get("n", m["type"]) for m in conn.outbox] == ["answer", "started", "finished", 3]
    conn.post({"type": "closed"})
    assert [m["type"] for m in conn.outbox] == ["answer", "started", "finished", "closed"]
    conn.post({"type": "stats", "n": 4})  # only control messages queued: the new stats is dropped
    assert [m["type"] for m in conn.outbox] == ["answer", "started", "finished", "closed"]
    assert ws.closed_with is None and conn.open
    conn.post({"type": "error"})  # no room and nothing droppable: the connection is closed
    await asyncio.sleep(0)
    assert not conn.open and ws.closed_with is not None and ws.closed_with[0] == 1008
    assert [m["type"] for m in conn.outbox] == ["answer", "started", "finished", "closed"]
    conn.post({"type": "closed"})  # nothing more is queued on a closing connection
    assert len(conn.outbox) == 4


# ---- 4. an unexpected exception closes the connection's session -----------------------------------


async def test_an_internal_error_closes_the_session_it_reports(start_server, monkeypatch) -> None:
    app = await start_server()
    client = await PeerClient(ws_url(app), keep_video=False).connect()

    def boom(self, spec) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(Session, "switch", boom)
    try:
        await client.start(mode="push")
        await client.send({"type": "switch", "prompt": "x"})
        error = await client.wait_for("error", timeout=5)
        closed = await client.wait_for("closed", timeout=5)
        await client.send({"type": "ping"})
        await client.wait_for("pong", timeout=5)  # the connection itself goes on
    finally:
        await client.close()
    assert error["code"] == "internal" and "injected failure" in error["message"]
    assert closed["session"] == client.session
    assert len(app.registry) == 0


# ---- 5./6. odd HTTP requests ----------------------------------------------------------------------


async def test_a_path_with_nul_is_not_found(start_server) -> None:
    app = await start_server()
    for path in ("%00", "index.html%00.js", "a%00/b"):
        assert await asyncio.to_thread(status_of, app.url + path) == 404, path


async def test_two_authorization_headers_are_unauthorized(start_server) -> None:
    app = await start_server(auth_tokens=[TOKEN])
    one = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    two = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    assert await raw_status(app, one) == 200
    assert await raw_status(app, two) == 401


# ---- 7. the connection cap ------------------------------------------------------------------------


async def test_connections_beyond_the_cap_get_503(start_server) -> None:
    app = await start_server(max_sessions=1, max_connections_per_client=0)  # all from one address here
    assert app.max_connections == 12
    url = ws_url(app)
    open_ = [await websockets.connect(url) for _ in range(app.max_connections)]
    try:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(url)
        assert refused.value.response.status_code == 503
        assert b"too many connections" in refused.value.response.body
        await open_.pop().close()
        for _ in range(100):
            if len(app.connections) < app.max_connections:
                break
            await asyncio.sleep(0.02)
        open_.append(await websockets.connect(url))  # a place freed up
    finally:
        for ws in open_:
            await ws.close()


# ---- 8. push rate default and playback events for a pushing app -----------------------------------


async def test_a_json_push_without_rate_is_16k_whatever_the_offer_said(start_server) -> None:
    app = await start_server()
    client = await PeerClient(ws_url(app), keep_video=False).connect()
    try:
        await client.start(mode="push", sample_rate=48_000)  # the rate of binary frames
        pcm = (np.sin(np.arange(8000) / 5) * 6000).astype("<i2")
        await client.send({"type": "push", "audio": base64.b64encode(pcm.tobytes()).decode()})
        await client.send({"type": "push_end"})
        finished = await client.wait_for("finished", timeout=8)
    finally:
        await client.close()
    assert abs(finished["position"] - 0.5) < 0.01


async def test_an_app_pushing_into_another_connections_session_gets_its_playback_events(start_server) -> None:
    app = await start_server()
    viewer = await PeerClient(ws_url(app), keep_video=False).connect()
    producer = await PeerClient(ws_url(app)).connect()
    try:
        await viewer.start(mode="push")
        pcm = (np.sin(np.arange(8000) / 5) * 6000).astype(np.int16)
        await producer.send(producer.push_b64(pcm, session=viewer.session, token=viewer.token))
        await producer.send({"type": "push_end", "session": viewer.session, "token": viewer.token})
        started = await producer.wait_for("started", timeout=8)
        finished = await producer.wait_for("finished", timeout=8)
        await viewer.wait_for("finished", timeout=2)  # the viewer still gets them too
    finally:
        await producer.close()
        await viewer.close()
    assert started["session"] == finished["session"] == viewer.session
    assert started["utterance"] == finished["utterance"] == 1 and abs(finished["position"] - 0.5) < 0.01
    assert "error" not in producer.types() and "closed" not in producer.types()
