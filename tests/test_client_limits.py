"""One client cannot hold the server alone: per-address caps on open WebSockets and on sessions still
waiting for their peer connection, and a short deadline for sessions that never connect."""

from __future__ import annotations

import asyncio
import time

import pytest
import websockets
from server_peer import PeerClient, offer_reply

from server.config import ServerConfig


def ws_url(app) -> str:
    return app.url.replace("http", "ws") + "ws"


def test_the_defaults_are_eight_connections_two_pending_sessions_and_ten_seconds() -> None:
    config = ServerConfig()
    assert (config.max_connections_per_client, config.max_pending_per_client, config.connect_timeout_s) == (8, 2, 10.0)


async def test_connections_beyond_the_per_client_cap_get_429_and_a_closed_one_frees_its_place(start_server) -> None:
    app = await start_server(max_connections_per_client=3)
    assert app.max_connections > 3  # the server as a whole still has room
    url = ws_url(app)
    open_ = [await websockets.connect(url) for _ in range(3)]
    try:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(url)
        assert refused.value.response.status_code == 429
        assert b"from this address" in refused.value.response.body
        await open_.pop().close()
        for _ in range(100):
            if app.clients.may_connect("127.0.0.1"):
                break
            await asyncio.sleep(0.02)
        open_.append(await websockets.connect(url))
    finally:
        for ws in open_:
            await ws.close()


async def test_offers_beyond_the_pending_cap_get_too_many_pending_until_a_session_connects(start_server) -> None:
    app = await start_server(max_pending_per_client=1, max_sessions=4)
    url = ws_url(app)
    first, second, third = [await PeerClient(url, keep_video=False).connect() for _ in range(3)]
    try:
        waiting = await offer_reply(first)  # answered, but its peer connection never starts
        assert waiting["type"] == "answer", waiting
        refused = await offer_reply(second)
        assert refused["code"] == "too_many_pending" and refused["retryAfterS"] == 10.0, refused
        assert len(app.registry) == 1  # refused before anything was allocated
        await first.send({"type": "stop"})
        await first.wait_for("closed")
        await third.start(mode="push")  # a session that connects does not count
        await third.wait_frames(5)
        assert (await offer_reply(second))["type"] == "answer"
    finally:
        for client in (first, second, third):
            await client.close()


async def test_a_session_that_never_connects_is_closed_after_the_connect_timeout(start_server) -> None:
    app = await start_server(connect_timeout_s=1.0)
    client = await PeerClient(ws_url(app), keep_video=False).connect()
    try:
        t0 = time.monotonic()
        answer = await offer_reply(client)
        closed = await client.wait_for("closed", timeout=10)
        waited = time.monotonic() - t0
        assert closed["session"] == answer["session"] and "no peer connection after 1 s" in closed["reason"]
        assert waited < 5  # bounded: 1 s plus closing
        assert len(app.registry) == 0
    finally:
        await client.close()
