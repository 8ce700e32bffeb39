"""Scale and drain of a cluster's replicas (server/cluster/autoscale.py, Serve's autoscaler and drain): a
local Ray cluster of a head and two worker nodes on loopback, preview replicas, real aiortc peers.

The autoscaler keeps room for one session more than run (replicas = ceil((sessions + 1) / slots)):
sessions that fill the one replica bring up a second, on the other node; sessions that fit in fewer
replicas let one go, and the one going (whichever Serve picks) takes no new session and lets its running
one finish: the session plays on through the scale-down and ends normally, and only then does the
replica leave. Timing is judged in media time (RTP timestamps).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from cluster_helpers import REPLICA, delete_app, eventually, media_seconds, module_cluster, start_front_door
from server_peer import PeerClient, offer_reply

pytest.importorskip("ray.serve")

FAST = {"upscale_delay_s": 0.5, "downscale_delay_s": 1.0, "max_pending_per_client": 0, **REPLICA}
"""Quick decisions, for a test; every peer here is 127.0.0.1."""


cluster = pytest.fixture(scope="module", name="cluster")(module_cluster)


@pytest.fixture
async def front_door(cluster):
    """`await front_door(**settings)`: a front door that deploys its own application, deleted (with its
    replicas) when the test ends."""
    doors: list[Any] = []

    async def start(**fields):
        doors.append(await start_front_door(cluster.address, **{**FAST, **fields}))
        return doors[-1]

    yield start
    for door in doors:
        await door.stop(end_sessions=True)
        await asyncio.to_thread(delete_app, door.config.cluster_app)


def ws_url(door) -> str:
    return door.url.replace("http", "ws") + "ws"


async def replicas(door) -> dict[str, str]:
    """Replica id -> node id of the replicas that report now."""
    await door._refresh()
    return {r["replica"]: r["node"] for r in door.reports}


async def test_sessions_that_fill_the_one_replica_bring_up_a_second_on_the_other_node(front_door) -> None:
    door = await front_door(cluster_app="scale-up", replicas_min=1, replicas_max=2, sessions_per_replica=2)
    first = await replicas(door)
    assert len(first) == 1
    clients = [await PeerClient(ws_url(door), keep_video=False).connect() for _ in range(3)]
    try:
        for c in clients[:2]:
            await c.start(mode="push")
        full = time.monotonic()
        refused = await offer_reply(clients[2])  # the one replica is full, the second is not up yet
        both = await eventually(lambda: _two(door), 40, "a second replica")
        scaled_s = time.monotonic() - full
        answer = await start_when_placed(clients[2])  # Serve's routers hear of the new replica soon after
        await clients[2].wait_frames(10)
        placed = door.sessions[answer["session"]].placement
    finally:
        for c in clients:
            await c.close()
    print(f"cluster: a second replica reported {scaled_s:.1f} s after the first one filled")
    assert refused["code"] == "busy" and refused["retryAfterS"] > 0
    old_node = next(iter(first.values()))
    new_replica, new_node = next((r, n) for r, n in both.items() if r not in first)
    assert new_node != old_node
    assert placed["replica"] == new_replica, "the session beyond the first replica goes to the new one"


async def start_when_placed(client: PeerClient, timeout: float = 30.0) -> dict:
    """`client.start(mode="push")`, offered again while the answer is `busy` (as a client honouring
    `retryAfterS` would, sooner)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = len(client.messages)
        start = asyncio.create_task(client.start(mode="push"))
        refused = asyncio.create_task(client.wait_for("error", after=seen, timeout=25))
        await asyncio.wait({start, refused}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            refused.cancel()
            return start.result()
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        await client.pc.close()
        error = refused.result()
        assert error["code"] == "busy" and time.monotonic() < deadline, error
        await asyncio.sleep(0.5)


async def _two(door) -> dict[str, str] | None:
    found = await replicas(door)
    return found if len(found) == 2 else None


async def test_a_replica_removed_by_scale_down_lets_its_running_session_finish(front_door) -> None:
    door = await front_door(
        cluster_app="drain",
        replicas_min=1,
        replicas_max=2,
        sessions_per_replica=3,
        drain_timeout_s=60,
        upscale_delay_s=3.0,  # the one session placed while a replica drains does not bring up a third
        downscale_delay_s=2.0,
    )
    clients = [await PeerClient(ws_url(door), keep_video=False).connect() for _ in range(5)]
    try:
        # three sessions fill the one replica, a second comes up and takes a fourth
        sids = [(await c.start(mode="push"))["session"] for c in clients[:3]]
        await eventually(lambda: _two(door), 40, "a second replica")
        sids.append((await start_when_placed(clients[3]))["session"])
        running = {door.sessions[sids[i]].placement["replica"]: clients[i] for i in (0, 3)}
        # two sessions end: the two left, one on each replica, fit in one, so one replica goes
        for c in clients[1:3]:
            await c.send({"type": "stop"})
        await eventually(lambda: _stopping(door.config), 40, "a replica stopping")
        draining_since = time.monotonic()
        # the replica going takes no new session: the one staying does
        late = await clients[4].start(mode="push")
        staying = door.sessions[late["session"]].placement["replica"]
        await clients[4].send({"type": "stop"})
        going = next(r for r in running if r != staying)
        await asyncio.sleep(3)
        played = {r: media_seconds(c, since=draining_since) for r, c in running.items()}
        still_two = len(await replicas(door)) == 2  # the one going waits for its session
        going_client = running[going]
        await going_client.send({"type": "stop"})
        closed = await going_client.wait_for("closed", timeout=10)
        stopped = time.monotonic()
        await eventually(lambda: _only(door, staying), 40, "the drained replica gone")
        gone_s = time.monotonic() - stopped
    finally:
        for c in clients:
            await c.close()
    print(f"cluster: a draining replica left {gone_s:.1f} s after its last session ended")
    assert len(running) == 2 and going in running, "the sessions left run on both replicas"
    assert all(s >= 2.0 for s in played.values()), played
    assert still_two
    assert closed["reason"] == "stopped by the client"
    errors = [[m["code"] for m in c.messages if m["type"] == "error"] for c in clients]
    assert set(errors[3]) <= {"busy"}, "only the fourth session's offers while the second replica came up"
    assert all(not e for i, e in enumerate(errors) if i != 3), errors


async def _stopping(config) -> int:
    from server.cluster import deploy

    return (await asyncio.to_thread(deploy.replica_counts, config)).get("STOPPING", 0)


async def _only(door, replica: str) -> bool:
    found = await replicas(door)
    return list(found) == [replica]
