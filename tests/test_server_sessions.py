"""Several sessions at once, the session limit, and nothing left behind when peers leave."""

from __future__ import annotations

import asyncio
import gc
import threading
import urllib.request

import numpy as np
from server_peer import PeerClient

from liveavatar.backends.preview.generator import PreviewGenerator
from server.avatar import AvatarStream
from server.session import Session
from server.webrtc import WebRtcTransport


def metrics(app) -> dict[str, float]:
    text = urllib.request.urlopen(app.url + "metrics").read().decode()
    return {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")
    }


async def read_metrics(app) -> dict[str, float]:
    return await asyncio.to_thread(metrics, app)


def live_sessions() -> list[object]:
    gc.collect()
    # type(), not isinstance(): isinstance() looks through weakref proxies, and a dead proxy among the
    # heap's objects would raise ReferenceError.
    return [o for o in gc.get_objects() if type(o) in (Session, AvatarStream, WebRtcTransport)]


async def wait_until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not reached")


async def test_two_sessions_stream_at_once_and_leave_nothing_behind(start_server) -> None:
    app = await start_server(max_sessions=2)
    ws_url = app.url.replace("http", "ws") + "ws"
    a = await PeerClient(ws_url, keep_video=False).connect()
    b = await PeerClient(ws_url, keep_video=False).connect()
    third = await PeerClient(ws_url).connect()
    try:
        await a.start(mode="push")
        await b.start(mode="mic")
        assert a.session != b.session and len(app.registry) == 2
        await asyncio.gather(a.wait_frames(20), b.wait_frames(20))
        pushed = (np.sin(np.arange(16_000) / 3) * 8000).astype(np.int16)
        await a.send(a.push_b64(pushed))
        await a.send({"type": "push_end"})
        await a.wait_for("finished", timeout=8)
        assert "started" not in b.types()  # a's audio went to a's session only

        with_two = await read_metrics(app)
        assert with_two["liveavatar_sessions_active"] == 2 and with_two["liveavatar_frames_sent_total"] > 40

        seen = len(third.messages)
        await third.send({"type": "offer", "sdp": a.pc.localDescription.sdp, "mode": "push"})
        full = await third.wait_for("error", after=seen)
        assert full["code"] == "server_full"

        await a.close()  # leaves by closing the WebSocket (and its peer)
        await b.pc.close()  # vanishes from the media path only; the WebSocket stays open
        await wait_until(lambda: len(app.registry) == 0)
        closed = await b.wait_for("closed", timeout=5)
        assert "peer connection" in closed["reason"]
    finally:
        for client in (a, b, third):
            await client.close()

    after = await read_metrics(app)
    assert after["liveavatar_sessions_active"] == 0
    assert after["liveavatar_sessions_total"] == 2 and after["liveavatar_sessions_rejected_total"] == 1
    assert after["liveavatar_queue_depth"] == 0 and after["liveavatar_worker_queue_depth"] == 0
    await wait_until(lambda: not live_sessions())  # no session, stream or transport survives, not even in a cycle


async def test_stop_ends_the_session_and_the_connection_can_start_another(start_server) -> None:
    app = await start_server(max_sessions=1)
    client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
    try:
        first = await client.start(mode="push")
        await client.wait_frames(5)
        await client.send({"type": "stop"})
        await client.wait_for("closed", timeout=5)
        assert len(app.registry) == 0
        await client.pc.close()
        second = await client.start(mode="push")
        await client.wait_frames(5)
        assert second["session"] != first["session"] and len(app.registry) == 1
    finally:
        await client.close()
    await wait_until(lambda: len(app.registry) == 0)


async def test_video_codec_follows_the_client_preference_or_the_server_setting(start_server) -> None:
    auto = await start_server()
    forced = await start_server(video_codec="h264")
    codecs = []
    for app, prefer in ((auto, None), (auto, "h264"), (forced, None)):
        client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
        try:
            answer = await client.start(mode="push", codec=prefer)
            await client.wait_frames(5)
            codecs.append(answer["videoCodec"])
        finally:
            await client.close()
    assert codecs == ["VP8", "H264", "H264"]


class SlowFirstBlock(PreviewGenerator):
    """The preview with a flat grey poster, and a first block that waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def poster(self, state) -> np.ndarray:
        return np.full((state.size.height, state.size.width, 3), 180, np.uint8)

    def step(self, state, window) -> np.ndarray:
        self.release.wait(timeout=20)
        return super().step(state, window)


async def test_a_stream_shows_the_poster_until_its_first_block_is_out(start_server) -> None:
    gen = SlowFirstBlock()
    app = await start_server(generator=gen, size="256*256")
    client = await PeerClient(app.url.replace("http", "ws") + "ws", thumb=64).connect()
    try:
        await client.start(mode="push")
        await client.wait_frames(10)
        waiting = [img for _, _, img in client.got.video]
        gen.release.set()
        await client.wait_frames(len(waiting) + 30, timeout=10)
        generated = client.got.video[-1][2]
    finally:
        gen.release.set()
        await client.close()
    assert all(abs(float(img.mean()) - 180) < 6 and img.std() < 4 for img in waiting)  # the poster, not black
    assert generated.std() > 20  # then the avatar itself
