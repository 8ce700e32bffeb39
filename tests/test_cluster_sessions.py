"""Sessions through a cluster front door (server/cluster/): a local Ray cluster of a head and two worker
nodes on loopback, one preview replica of two session slots on each worker, real aiortc peers.

Placement spreads sessions over the nodes and answers `busy` with a retry hint when every slot is taken;
every message of a session reaches its replica and push, mic, interrupt, switch and a token holder work as
on one host; `/healthz` and `/metrics` see every replica and host. A killed replica, or a removed node,
ends only its own sessions with `replica_lost`, and new sessions go to the replica that is left; a front
door that dies leaves flowing media playing, and its successor refuses their signalling clearly.

Timing is judged in media time (RTP timestamps), never in wall time. The node removal runs last: it
takes a node away for good.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from typing import Any

import numpy as np
import pytest
from cluster_helpers import REPLICA, eventually, media_seconds, module_cluster, node_of, start_front_door
from server_peer import ArrayAudioTrack, PeerClient, fps_by_arrival, offer_reply
from test_server_integration import mic_signal

from liveavatar.media_io import decode_audio

pytest.importorskip("ray.serve")

APP = {
    "cluster_app": "sessions",
    "replicas_min": 2,
    "replicas_max": 2,
    "sessions_per_replica": 2,
    "max_pending_per_client": 0,  # every peer here is 127.0.0.1
    **REPLICA,
}


cluster = pytest.fixture(scope="module", name="cluster")(module_cluster)


@pytest.fixture
async def front_door(cluster):
    """`await front_door(**settings)`: an in-process front door of the module's application (deployed by
    the first, attached to by the others); its sessions are stopped when the test ends."""
    doors: list[Any] = []

    async def start(**fields):
        doors.append(await start_front_door(cluster.address, **{**APP, **fields}))
        return doors[-1]

    yield start
    for door in doors:
        await door.stop(end_sessions=True)
    # The replicas are empty again for the next test. 30 s: after a node is removed, a replacement replica
    # (and the registry, if it ran there) start elsewhere and the gone replica's last report must age out
    # (STALE_S) before the view is clean; on a busy 2-core CI machine that took longer than 10 s.
    for door in doors:
        await eventually(lambda d=door: _refreshed(d), 30, "sessions ended on the replicas")
    from server.cluster.router import SETTLE_S, STATS_PERIOD_S

    # and the routers' copy of their stats (polled, broadcast) was taken late enough to drop the placements
    await asyncio.sleep(SETTLE_S + 2 * STATS_PERIOD_S + 1.0)


async def _refreshed(door) -> bool:
    await door._refresh()
    return sum(r["sessions"] for r in door.reports) == 0


def ws_url(door) -> str:
    return door.url.replace("http", "ws") + "ws"


def speech(seconds: float, rate: int = 16_000) -> np.ndarray:
    from conftest import ASSETS

    pcm = decode_audio(ASSETS / "speech_en_16k.wav", rate=rate).samples[: int(seconds * rate)]
    return (pcm * 32767).astype(np.int16)


async def test_sessions_spread_over_the_nodes_and_one_beyond_every_slot_gets_busy_with_a_retry_hint(
    front_door,
) -> None:
    door = await front_door()
    clients = [await PeerClient(ws_url(door), keep_video=False).connect() for _ in range(5)]
    try:
        assert clients[0].config["backend"] == "preview" and clients[0].config["size"] == "128*128"
        answers = [await c.start(mode="push") for c in clients[:4]]
        nodes = [door.sessions[a["session"]].placement["node"] for a in answers]
        refused = await offer_reply(clients[4])
        for c in clients[:4]:
            await c.wait_frames(25)
        await door._refresh()
        status, healthz = door._health()
        metrics = door._metrics_text()
    finally:
        for c in clients:
            await c.close()
    placing_ms = 1000 * door.placements.seconds_sum / door.placements.count
    answering_ms = 1000 * door.placements.answer_seconds_sum / door.placements.answers
    print(f"cluster: placing a session took {placing_ms:.0f} ms on average, its answer {answering_ms:.0f} ms")
    assert nodes[0] != nodes[1], "the second session goes to the emptier replica, on the other node"
    assert sorted(nodes.count(n) for n in set(nodes)) == [2, 2], nodes
    assert refused["code"] == "busy" and refused["retryAfterS"] > 0, refused
    assert "replica full" in refused["message"] and "slots are taken" in refused["message"]
    assert status == 200 and "2 replicas ready on 2 hosts (4 sessions, room for 0 more)" in healthz
    for node in set(nodes):
        assert f'liveavatar_host_sessions{{node="{node}",host=' in metrics
    assert metrics.count("liveavatar_replica_sessions{") == 2 and "liveavatar_sessions_active 4" in metrics
    assert "liveavatar_cluster_replicas_ready 2" in metrics and 'liveavatar_errors_total{code="busy"} 1' in metrics


async def test_a_client_may_keep_only_so_many_sessions_waiting_for_their_peer(front_door) -> None:
    """The front door counts a session as waiting until its replica says its peer connected."""
    door = await front_door(max_pending_per_client=1)
    clients = [await PeerClient(ws_url(door), keep_video=False).connect() for _ in range(3)]
    try:
        connected = await clients[0].start(mode="push")
        await eventually(lambda: door.sessions[connected["session"]].connected, 10, "peer connected")
        waiting = await offer_reply(clients[1])  # answered, and its peer never connects
        refused = await offer_reply(clients[2])
    finally:
        for c in clients:
            await c.close()
    assert waiting["type"] == "answer"
    assert refused["code"] == "too_many_pending" and refused["retryAfterS"] == 10


async def test_every_message_of_a_session_reaches_its_replica_and_a_token_holder_drives_it(front_door) -> None:
    door = await front_door()
    viewer = await PeerClient(ws_url(door), keep_video=False).connect()
    app = await PeerClient(ws_url(door), keep_video=False).connect()  # an app's back end: no session of its own
    try:
        answer = await viewer.start(mode="push")
        sid = answer["session"]
        await viewer.send({"type": "ice", "candidate": None})  # end of candidates: relayed, nothing to answer
        for i in range(5):  # five 0.2 s pushes make one utterance: each must reach the one session
            await viewer.send(viewer.push_b64(speech(1.0)[i * 3200 : (i + 1) * 3200]))
        await viewer.send({"type": "push_end"})
        done = await viewer.wait_for("finished", timeout=15, utterance=1)
        await viewer.send(viewer.push_b64(speech(4.0)))
        await viewer.wait_for("started", timeout=10, utterance=2)
        await viewer.send({"type": "interrupt"})
        cut = await viewer.wait_for("finished", timeout=10, utterance=2)
        await viewer.send({"type": "switch", "prompt": "a calm tutor"})
        switched = await viewer.wait_for("switched", timeout=10)
        # another connection drives it with its token, on the same replica
        await app.send(app.push_b64(speech(1.0), session=sid, token=answer["token"]))
        await app.send({"type": "push_end", "session": sid, "token": answer["token"]})
        heard = await app.wait_for("finished", timeout=15, session=sid)
        await app.send({"type": "push", "audio": "", "session": sid, "token": "not-its-token"})
        forbidden = await app.wait_for("error", timeout=5)
        await app.send({"type": "stop", "session": sid, "token": answer["token"]})
        await app.wait_for("closed", timeout=10, session=sid)
        closed = await viewer.wait_for("closed", timeout=10, session=sid)
    finally:
        await viewer.close()
        await app.close()
    assert done["position"] == pytest.approx(1.0, abs=0.05) and not done["interrupted"]
    assert cut["interrupted"] and cut["position"] < 4.0
    assert switched["block"] > 0
    assert heard["position"] == pytest.approx(1.0, abs=0.05)
    assert forbidden["code"] == "forbidden"
    assert closed["reason"] == "stopped by another connection"
    assert not [m for m in viewer.messages if m["type"] == "error"], viewer.messages


async def test_mic_mode_through_the_front_door_streams_at_25_fps_and_hears_the_speech(front_door, assets) -> None:
    door = await front_door()
    client = await PeerClient(ws_url(door)).connect()
    try:
        await client.start(mode="mic", mic=ArrayAudioTrack(mic_signal(assets)))
        onset = await client.wait_for("speech_start", timeout=15)
        await client.wait_frames(50)
    finally:
        await client.close()
    stamps = [pts for _, pts, _ in client.got.video]
    media_fps = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 90_000)
    arrival_fps = fps_by_arrival([t for t, _, _ in client.got.video])
    print(f"cluster mic session: {media_fps:.1f} fps over media time, {arrival_fps:.1f} by arrival")
    assert media_fps >= 24
    assert onset["at"] > 0
    assert sum(len(a) for _, _, a in client.got.audio) > 48_000


async def test_a_killed_replica_ends_only_its_sessions_with_replica_lost_and_new_ones_go_to_the_survivor(
    front_door,
) -> None:
    import ray

    door = await front_door()
    lost, kept, late = [await PeerClient(ws_url(door), keep_video=False).connect() for _ in range(3)]
    try:
        lost_sid = (await lost.start(mode="push"))["session"]
        kept_sid = (await kept.start(mode="push"))["session"]
        dead, alive = door.sessions[lost_sid].placement, door.sessions[kept_sid].placement
        assert dead["node"] != alive["node"]
        await lost.wait_frames(10)
        await kept.wait_frames(10)
        killed = time.monotonic()
        ray.kill(ray.get_actor(dead["actor"], namespace="serve"))
        error = await lost.wait_for("error", timeout=10)
        detected = time.monotonic() - killed
        closed = await lost.wait_for("closed", timeout=5, session=lost_sid)
        late_sid = (await late.start(mode="push"))["session"]
        await late.wait_frames(10)
        placed = door.sessions[late_sid].placement
        await asyncio.sleep(2.5)  # the survivor's session plays on
        replaced = await eventually(lambda: _replicas_ready(door, 2, exclude=dead["replica"]), 30, "replacement")
        replaced -= killed
        kept_played = media_seconds(kept, since=killed + 0.5)
    finally:
        for c in (lost, kept, late):
            await c.close()
    print(
        f"cluster: a killed replica's session got replica_lost {detected * 1000:.0f} ms after the kill; "
        f"Serve had a replacement ready {replaced:.1f} s after it"
    )
    assert error["code"] == "replica_lost" and lost_sid in error["message"]
    assert closed["reason"] == "replica lost"
    assert detected < 5
    assert placed["replica"] != dead["replica"]
    assert kept_played >= 1.5, "the other replica's session kept streaming"
    assert not [m for m in kept.messages if m["type"] in ("error", "closed")]


async def _replicas_ready(door, count: int, exclude: str) -> float:
    await door._refresh()
    ids = {r["replica"] for r in door.reports}
    return time.monotonic() if len(ids) == count and exclude not in ids else 0.0


async def test_a_front_door_that_dies_leaves_flowing_media_playing_and_its_successor_refuses_their_signalling(
    cluster, front_door, server_process
) -> None:
    await front_door()  # the application runs (deployed here if this test runs alone)
    args = ("--cluster", cluster.address, "--cluster-app", APP["cluster_app"], "--size", "128*128")
    first = server_process(*args)
    viewer = await PeerClient(first.url.replace("http", "ws") + "ws", keep_video=False).connect()
    app = None
    try:
        answer = await viewer.start(mode="push")
        await viewer.wait_frames(25)
        died = time.monotonic()
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
        await asyncio.sleep(3)
        played = media_seconds(viewer, since=died + 0.5)
        second = server_process(*args)
        app = await PeerClient(second.url.replace("http", "ws") + "ws").connect()
        await app.send({"type": "interrupt", "session": answer["session"], "token": answer["token"]})
        refused = await app.wait_for("error", timeout=5)
        await viewer.pc.close()  # the viewer leaves: its session ends on its replica with its peer connection
        ended = await eventually(lambda: _no_session(second.url), 40, "session ended")
    finally:
        await viewer.close()
        if app is not None:
            await app.close()
    assert played >= 2.0, f"only {played:.1f} s of media after the front door died"
    assert refused["code"] == "unknown_session" and "restarted" in refused["message"]
    assert ended


async def _no_session(url: str) -> bool:
    """The front door at `url` counts no session on any replica."""

    def get() -> str:
        with urllib.request.urlopen(url + "metrics", timeout=5) as r:
            return r.read().decode()

    return "liveavatar_sessions_active 0" in await asyncio.to_thread(get)


async def test_a_removed_node_ends_only_its_sessions_with_replica_lost(cluster, front_door) -> None:
    """Last in the module: the node does not come back."""
    door = await front_door()
    lost, kept, late = [await PeerClient(ws_url(door), keep_video=False).connect() for _ in range(3)]
    try:
        lost_sid = (await lost.start(mode="push"))["session"]
        kept_sid = (await kept.start(mode="push"))["session"]
        gone, alive = door.sessions[lost_sid].placement, door.sessions[kept_sid].placement
        await lost.wait_frames(10)
        await kept.wait_frames(10)
        removed = time.monotonic()
        await asyncio.to_thread(cluster.remove_node, node_of(cluster, gone["node"]), allow_graceful=False)
        error = await lost.wait_for("error", timeout=15)
        detected = time.monotonic() - removed
        late_sid = (await late.start(mode="push"))["session"]
        await late.wait_frames(10)
        placed = door.sessions[late_sid].placement
        await asyncio.sleep(2)
        kept_played = media_seconds(kept, since=removed + 0.5)
    finally:
        for c in (lost, kept, late):
            await c.close()
    print(f"cluster: a removed node's session got replica_lost {detected * 1000:.0f} ms after the removal")
    assert error["code"] == "replica_lost"
    assert placed["node"] == alive["node"] != gone["node"]
    assert kept_played >= 1.0
    assert not [m for m in kept.messages if m["type"] in ("error", "closed")]
