"""A cluster replica's server on its own, without Ray (server/cluster/replica_app.py): the single-host app
behind a front door's relay, with an aiortc peer on loopback standing in for the browser and a plain
WebSocket for the relay.

It takes only sessions placed on it, under the placed id, while it has room; it wants its key; and a
session whose media already flows outlives a relay that drops (a front door that died), ending with its
peer connection, while one still connecting ends with its relay as on one host.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import pytest
from cluster_helpers import SIZE, eventually, media_seconds
from server_peer import PeerClient, offer_reply

KEY = "relay-key-of-this-replica"


@pytest.fixture
async def replica():
    from server.cluster.replica_app import ReplicaApp
    from server.config import ServerConfig

    front = ServerConfig(cluster="auto", size=SIZE, sessions_per_replica=2).validate()
    config = front.replica_config(KEY)
    config.host = "127.0.0.1"
    app = ReplicaApp(config)
    await app.start()
    yield app
    await app.stop()


def relay_url(app, sid: str | None = None, key: str = KEY) -> str:
    query = f"?token={key}" + (f"&session={sid}" if sid else "")
    return app.url.replace("http", "ws") + "ws" + query


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


async def test_a_replica_takes_only_placed_sessions_while_it_has_room_and_wants_its_key(replica) -> None:
    config = replica.config
    assert (config.host, config.max_sessions, config.auth_tokens, config.max_pending_per_client) == (
        "127.0.0.1",
        2,
        [KEY],
        0,
    )
    assert replica.room().free == 2
    assert replica.reserve("s1") is None and replica.reserve("s2") is None
    room = replica.room()
    refused = replica.reserve("s3")
    assert (room.sessions, room.free) == (2, 0)
    assert refused is not None and refused["code"] == "busy" and refused["retryAfterS"] == 30
    assert "all 2 session slots are taken" in refused["message"]
    replica.release("s2")
    assert replica.room().free == 1

    stranger = await PeerClient(relay_url(replica)).connect()  # the key, but no placed session
    placed = await PeerClient(relay_url(replica, "s1")).connect()
    try:
        unplaced = await offer_reply(stranger)
        answer = await placed.start(mode="push")
    finally:
        await stranger.close()
        await placed.close()
    assert unplaced["code"] == "unknown_session" and "front door" in unplaced["message"]
    assert answer["session"] == "s1", "the session opens under the id its front door placed"
    statuses = [await asyncio.to_thread(status_of, replica.url + path) for path in ("healthz", "", "metrics")]
    assert statuses == [200, 404, 401], "health open; the page is the front door's; metrics want the key"


async def test_a_session_whose_media_flows_outlives_its_relay_and_ends_with_its_peer(replica) -> None:
    assert replica.reserve("flowing") is None
    client = await PeerClient(relay_url(replica, "flowing"), keep_video=False).connect()
    try:
        await client.start(mode="push")
        await client.wait_frames(25)
        cut = time.monotonic()
        client.ws.transport.abort()  # the front door died: its relay socket is gone, no close frame (1006)
        await asyncio.sleep(2.5)
        played = media_seconds(client, since=cut + 0.3)
        detached = set(replica.detached)
        await client.pc.close()  # the viewer leaves
        await eventually(lambda: replica.registry.get("flowing") is None, 15, "session ended with its peer")
    finally:
        await client.close()
    assert detached == {"flowing"}
    assert played >= 1.5, f"{played:.1f} s of media after the relay dropped"
    assert not replica.detached and replica.held() == 0


async def test_a_session_still_connecting_ends_with_its_relay_as_on_one_host(replica) -> None:
    from server_peer import offer_sdp

    assert replica.reserve("connecting") is None
    client = await PeerClient(relay_url(replica, "connecting")).connect()
    try:
        await client.send({"type": "offer", "sdp": await offer_sdp(), "mode": "push"})
        await client.wait_for("answer", timeout=10)  # answered, but no peer will ever connect
        await client.ws.close()
        await eventually(lambda: replica.registry.get("connecting") is None, 10, "session ended")
    finally:
        await client.close()
    assert not replica.detached


async def test_a_session_whose_front_door_ended_it_ends_here_even_while_its_media_flows(replica) -> None:
    # After `replica_lost` (or its client leaving) a front door closes the relay normally (1000): the session
    # must not play on, holding the replica's slot, for a client that was told `closed`.
    assert replica.reserve("ended") is None
    client = await PeerClient(relay_url(replica, "ended"), keep_video=False).connect()
    try:
        await client.start(mode="push")
        await client.wait_frames(25)
        await client.ws.close(1000, "session over at the front door")
        await eventually(lambda: replica.registry.get("ended") is None, 10, "session ended with its relay")
    finally:
        await client.close()
    assert not replica.detached and replica.held() == 0


async def test_a_replica_listens_on_the_first_free_port_of_its_range() -> None:
    import socket

    from server.cluster.replica_app import ReplicaApp
    from server.config import ServerConfig

    config = ServerConfig(cluster="auto", size=SIZE).validate().replica_config(KEY)
    config.host = "127.0.0.1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        first = taken.getsockname()[1]
        app = ReplicaApp(config, ports=range(first, first + 50))
        await app.start()
        try:
            assert first < app.port < first + 50
        finally:
            await app.stop()
