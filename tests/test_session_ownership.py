"""A session belongs to its connection: other connections drive it only with its capability token.
And the socket itself: same-origin pages only, bounded headers, no version banner, quiet refusal
logs, a message rate limit and idle sockets closed."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import pytest
import websockets
from server_peer import ArrayAudioTrack, PeerClient, raw_response

TONE = (np.sin(np.arange(8000) / 5) * 6000).astype(np.int16)  # 0.5 s at 16 kHz
TOKEN = "s3cret-token-0123456789"


def ws_url(app) -> str:
    return app.url.replace("http", "ws") + "ws"


def control_messages(session: str, **extra) -> list[dict]:
    """Every message that drives a session, addressed to `session` with `extra` (e.g. a token)."""
    fields = {"session": session, **extra}
    return [
        {"type": "push", "audio": PeerClient.push_b64(None, TONE)["audio"], **fields},
        {"type": "push_end", **fields},
        {"type": "interrupt", **fields},
        {"type": "switch", "prompt": "an intruder's prompt", **fields},
        {"type": "stop", **fields},
    ]


@pytest.mark.parametrize("mode", ["push", "mic"])
async def test_another_connection_without_the_token_is_forbidden(start_server, mode) -> None:
    app = await start_server()
    viewer = await PeerClient(ws_url(app), keep_video=False).connect()
    intruder = await PeerClient(ws_url(app)).connect()
    try:
        await viewer.start(mode=mode, **({"mic": ArrayAudioTrack(np.zeros(48_000 * 10))} if mode == "mic" else {}))
        for token in ({}, {"token": "not-the-token"}, {"token": ""}):
            for message in control_messages(viewer.session, **token):
                seen = len(intruder.messages)
                await intruder.send(message)
                error = await intruder.wait_for("error", after=seen, timeout=5)
                assert error["code"] == "forbidden", (message["type"], token, error)
        await viewer.send({"type": "ping"})
        await viewer.wait_for("pong", timeout=5)
        session = app.registry.get(viewer.session)
        assert session is not None and session.stream.feed.pending == 0 and not session.stream.feed.utterances
    finally:
        await intruder.close()
        await viewer.close()
    assert not {"started", "finished", "switched", "closed", "error"} & set(viewer.types())
    assert not {"started", "finished", "closed"} & set(intruder.types())


async def test_an_app_with_the_token_drives_the_session_and_can_stop_it(start_server) -> None:
    app = await start_server()
    viewer = await PeerClient(ws_url(app), keep_video=False).connect()
    producer = await PeerClient(ws_url(app)).connect()
    try:
        answer = await viewer.start(mode="push")
        assert isinstance(answer["token"], str) and len(answer["token"]) >= 16
        owner = {"session": viewer.session, "token": viewer.token}
        await producer.send(producer.push_b64(TONE, **owner))
        await producer.send({"type": "push_end", **owner})
        await producer.wait_for("finished", timeout=8)
        await producer.send({"type": "switch", "prompt": "the app's prompt", **owner})
        await viewer.wait_for("switched", timeout=5)
        await producer.send({"type": "stop", **owner})
        await producer.wait_for("closed", timeout=5, session=viewer.session)
        await viewer.wait_for("closed", timeout=5, session=viewer.session)
    finally:
        await producer.close()
        await viewer.close()
    assert "error" not in producer.types() and "error" not in viewer.types()
    assert len(app.registry) == 0


async def test_pages_of_another_origin_cannot_open_the_socket(start_server) -> None:
    app = await start_server(allowed_origins=["https://app.example.com"])
    url = ws_url(app)
    own = app.url.rstrip("/")
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        await websockets.connect(url, origin="https://evil.example.com")
    assert refused.value.response.status_code == 403
    for origin in (own, "https://app.example.com", None):  # its own page, an allowed one, an app
        ws = await websockets.connect(url, origin=origin)
        await ws.close()


async def test_oversized_headers_are_refused_and_no_version_banner_is_sent(start_server) -> None:
    app = await start_server()
    big = "".join(f"X-Filler-{i}: {'a' * 8000}\r\n" for i in range(3))
    refused = await raw_response(app, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{big}\r\n")
    assert refused.startswith(b"HTTP/1.1 431")
    ok = await raw_response(app, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and b"\r\nserver:" not in ok.lower()
    ws = await websockets.connect(ws_url(app))
    try:
        assert "Server" not in ws.response.headers
    finally:
        await ws.close()


async def test_refused_requests_are_logged_at_most_once_per_interval(start_server, caplog) -> None:
    app = await start_server(auth_tokens=[TOKEN])
    caplog.set_level(logging.WARNING, logger="server.app")
    for _ in range(30):
        reply = await raw_response(app, "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 401")
    lines = [r for r in caplog.records if "unauthorized" in r.getMessage()]
    assert len(lines) == 1


async def test_each_server_limits_its_own_refusal_log(start_server, caplog) -> None:
    """Two servers in one process (tests, an embedding app): one's refusals never silence the other's."""
    first, second = await start_server(auth_tokens=[TOKEN]), await start_server(auth_tokens=[TOKEN])
    caplog.set_level(logging.WARNING, logger="server.app")
    for app in (first, second, first):
        assert (await raw_response(app, "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 401")
    lines = [r for r in caplog.records if "unauthorized" in r.getMessage()]
    assert len(lines) == 2


async def test_a_message_flood_is_refused_then_closed_and_others_go_on(start_server) -> None:
    app = await start_server(max_messages_per_second=20)
    other = await PeerClient(ws_url(app)).connect()
    flood = await websockets.connect(ws_url(app))
    got: list[str] = []
    try:
        await flood.recv()  # config
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            for _ in range(1000):
                await flood.send("{not json")
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            async for raw in flood:
                got.append(raw)
        await asyncio.wait_for(flood.wait_closed(), 5)
        await other.send({"type": "ping"})
        await other.wait_for("pong", timeout=5)
    finally:
        await flood.close()
        await other.close()
    assert flood.close_code == 1008
    assert sum('"bad_json"' in m for m in got) <= 100 + 1  # 5 s of burst at most, then refused
    assert '"rate_limited"' in got[-1]


async def test_an_idle_socket_is_closed_but_one_with_a_session_stays(start_server) -> None:
    app = await start_server(idle_timeout_s=0.5)
    idle = await websockets.connect(ws_url(app))
    viewer = await PeerClient(ws_url(app), keep_video=False).connect()
    try:
        await viewer.start(mode="push")
        await idle.recv()  # config
        await asyncio.wait_for(idle.wait_closed(), 5)
        await asyncio.sleep(1.0)  # twice the timeout without a message from the viewer
        await viewer.send({"type": "ping"})
        await viewer.wait_for("pong", timeout=5)
    finally:
        await idle.close()
        await viewer.close()
    assert idle.close_code == 1000 and "idle" in idle.close_reason
