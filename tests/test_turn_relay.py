"""NAT traversal tested for real: Debian's coturn on loopback, and peers that may only use relay candidates.

`docker/install.sh --dev` installs coturn. Without it the tests skip on a developer machine and fail in
CI (CI=true), so a broken install step cannot hide behind a green run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import server_peer  # tests/server_peer.py: the Python stand-in for the browser
from aiortc import MediaStreamTrack, RTCPeerConnection
from av import VideoFrame
from processes import stop_process

from server.turn import check_turn, ice_servers, probe_turn, rest_credential, rtc_configuration

SECRET = "loopback-test-secret"
REALM = "liveavatar.test"
TURNSERVER_CONF = Path(__file__).resolve().parent.parent / "docker" / "turnserver.conf"
FRAME_LUMA = 180  # what the sender paints; the receiver checks it came through


@dataclass(frozen=True)
class Coturn:
    url: str
    secret: str
    log: Path


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (coturn listens on both)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on 127.0.0.1")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"turnserver exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"turnserver did not listen on {port} within {timeout_s} s:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn with `use-auth-secret` on a random loopback port, relaying between loopback addresses."""
    binary = shutil.which("turnserver")
    if binary is None:
        message = "coturn's turnserver is not installed (bash docker/install.sh --dev installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("coturn")
    log = work / "turnserver.log"
    port = _free_port()
    relay_min = 20000 + (port % 20000)  # a private relay port range per run; loopback only
    # The deployment's own turnserver.conf (REST auth, quotas, denied private ranges), moved to loopback:
    # what passes here is what docker/compose.yaml runs, except for addresses and ports.
    cmd = [
        binary, "-c", str(TURNSERVER_CONF),
        "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--listening-port", str(port),
        "--min-port", str(relay_min), "--max-port", str(relay_min + 200),
        "--static-auth-secret", SECRET, "--realm", REALM,
        "--allow-loopback-peers", "--allowed-peer-ip", "127.0.0.1",
        "--pidfile", str(work / "turnserver.pid"), "--userdb", str(work / "turndb"),
        "--verbose",
    ]  # fmt: skip
    # turnserver.conf logs to stdout (as a container should): the file gets it here.
    with log.open("wb") as log_out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc, log)
        yield Coturn(url=f"turn:127.0.0.1:{port}", secret=SECRET, log=log)
    finally:
        stop_process(proc, timeout=5)


class PatternTrack(MediaStreamTrack):
    """Small noisy frames around a known brightness: the receiver can tell real frames from nothing, and
    the noise keeps VP8 from compressing the stream to a trickle, so coturn's byte counts show media."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._rng = np.random.default_rng(7)

    async def recv(self) -> VideoFrame:
        await asyncio.sleep(1 / 30)
        pixels = self._rng.integers(FRAME_LUMA - 30, FRAME_LUMA + 30, (120, 160, 3), dtype=np.uint8)
        frame = VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts, frame.time_base = self._pts, Fraction(1, 90_000)
        self._pts += 3000
        return frame


def _nominated_pair(pc: RTCPeerConnection):  # -> aioice CandidatePair
    """The candidate pair ICE nominated: aioice keeps it per component on the connection."""
    ice = pc.getTransceivers()[0].receiver.transport.transport
    pairs = list(ice._connection._nominated.values())
    assert len(pairs) == 1, pairs
    return pairs[0]


async def _connect(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


def _peer_usage(log_text: str, user: str) -> list[tuple[int, int]]:
    """(bytes received from, bytes sent to) the peers of each of `user`'s closed TURN allocations.

    coturn writes one `peer usage:` line per allocation when it is freed: the traffic it relayed."""
    pattern = rf"peer usage: realm=<[^>]*>, username=<\d+:{re.escape(user)}>, rp=\d+, rb=(\d+), sp=\d+, sb=(\d+)"
    return [(int(rb), int(sb)) for rb, sb in re.findall(pattern, log_text)]


async def test_probe_accepts_the_right_secret_and_returns_a_relay_address(coturn: Coturn) -> None:
    [result] = await check_turn([coturn.url], coturn.secret)
    assert result.ok, result.error
    assert result.relayed_address is not None
    assert result.relayed_address[0] == "127.0.0.1"


async def test_probe_over_tcp_transport(coturn: Coturn) -> None:
    [result] = await check_turn([f"{coturn.url}?transport=tcp"], coturn.secret)
    assert result.ok, result.error


async def test_wrong_secret_gives_a_clear_error(coturn: Coturn) -> None:
    [result] = await check_turn([coturn.url], "not-the-secret")
    assert not result.ok
    assert "401" in result.error
    assert "static-auth-secret" in result.error
    assert coturn.url.removeprefix("turn:") in result.error


async def test_expired_credential_is_refused(coturn: Coturn) -> None:
    stale = rest_credential(coturn.secret, ttl_s=60, now=time.time() - 3600)
    result = await probe_turn(coturn.url, stale.username, stale.credential)
    assert not result.ok
    assert "401" in result.error


async def test_unreachable_turn_server_gives_a_clear_error() -> None:
    port = _free_port()  # nothing listens there
    [result] = await check_turn([f"turn:127.0.0.1:{port}"], SECRET, timeout_s=1.0)
    assert not result.ok
    assert "did not answer within 1 s" in result.error


async def test_wrong_secret_leaves_a_relay_only_peer_without_candidates(coturn: Coturn) -> None:
    """Why the probe exists: WebRTC itself reports a wrong secret only as 'no candidates'."""
    servers = ice_servers(turn_urls=[coturn.url], turn_secret="not-the-secret")
    pc = RTCPeerConnection(rtc_configuration(servers, relay_only=True))
    try:
        pc.addTrack(PatternTrack())
        await pc.setLocalDescription(await pc.createOffer())
        assert "a=candidate" not in pc.localDescription.sdp
    finally:
        await pc.close()


async def test_relay_only_peers_send_video_through_turn(coturn: Coturn) -> None:
    """Both peers may only use TURN relay candidates; frames arrive and ICE nominated a relay pair."""
    servers = ice_servers(turn_urls=[coturn.url], turn_secret=coturn.secret, user="relay-media-test")
    config = rtc_configuration(servers, relay_only=True)
    sender, receiver = RTCPeerConnection(config), RTCPeerConnection(config)
    received: asyncio.Queue[MediaStreamTrack] = asyncio.Queue()
    receiver.on("track", received.put_nowait)
    try:
        sender.addTrack(PatternTrack())
        await asyncio.wait_for(_connect(sender, receiver), 20)
        for sdp in (sender.localDescription.sdp, receiver.localDescription.sdp):
            types = re.findall(r"a=candidate:.* typ (\w+)", sdp)
            assert types and set(types) == {"relay"}, sdp

        track = await asyncio.wait_for(received.get(), 10)
        frames = [await asyncio.wait_for(track.recv(), 10) for _ in range(10)]
        luma = frames[-1].to_ndarray(format="gray")
        assert luma.shape == (120, 160)
        assert abs(float(luma.mean()) - FRAME_LUMA) < 8

        for pc in (sender, receiver):
            pair = _nominated_pair(pc)
            assert pair.local_candidate.type == "relay"
            assert pair.remote_candidate.type == "relay"
            assert pc.connectionState == "connected"
    finally:
        await sender.close()
        await receiver.close()

    # coturn's own accounting, once it frees both allocations: the receiver's relay got the 10+ noisy
    # VP8 frames from its peer (~35 kB; the DTLS handshake and ICE checks alone are ~1-2 kB).
    deadline = time.monotonic() + 10
    while len(usage := _peer_usage(coturn.log.read_text(), "relay-media-test")) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(usage) == 2, coturn.log.read_text()[-3000:]
    assert max(received for received, _ in usage) > 20_000, usage


# ---- the project's server, with a relay-only client standing in for the browser ---------------------


def _ws_url(app: Any) -> str:
    return app.url.replace("http://", "ws://", 1) + "ws"


async def test_relay_only_session_streams_the_avatar_through_turn(
    coturn: Coturn, start_server: Callable[..., Awaitable[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real session: the server hands out REST credentials, both ends are forced to relay, video flows."""
    app = await start_server(turn_url=coturn.url, turn_secret=coturn.secret, ice_transport_policy="relay")
    client = await server_peer.PeerClient(_ws_url(app), keep_video=False).connect()
    try:
        assert client.config["iceTransportPolicy"] == "relay"
        assert coturn.secret not in json.dumps(client.config)
        [turn] = client.config["iceServers"]
        assert turn["urls"] == [coturn.url] and turn["username"].endswith(":liveavatar")
        # What a browser does with iceTransportPolicy "relay": only TURN relay candidates, from the
        # credentials the server sent.
        relay = rtc_configuration(client.config["iceServers"], relay_only=True)
        monkeypatch.setattr(server_peer, "RTCPeerConnection", lambda: RTCPeerConnection(relay))

        await client.start(mode="push")
        await client.wait_frames(10, timeout=60)

        assert client.pc is not None
        pair = _nominated_pair(client.pc)
        assert (pair.local_candidate.type, pair.remote_candidate.type) == ("relay", "relay")
        [session] = list(app.registry)
        server_pair = _nominated_pair(session.transport.pc)
        assert server_pair.local_candidate.type == "relay"
        assert app.turn_error == ""  # the start-up probe passed with the right secret
    finally:
        await client.close()


async def test_wrong_secret_is_reported_in_the_server_log_and_to_the_client(
    coturn: Coturn, start_server: Callable[..., Awaitable[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="server.app")
    app = await start_server(turn_url=coturn.url, turn_secret="not-the-secret")
    deadline = time.monotonic() + 10
    while not app.turn_error and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "TURN check failed" in caplog.text
    assert "401" in caplog.text and "static-auth-secret" in caplog.text
    assert "not-the-secret" not in caplog.text

    client = await server_peer.PeerClient(_ws_url(app), keep_video=False).connect()
    try:
        assert "401" in client.config["turnError"]
        assert "static-auth-secret" in client.config["turnError"]
    finally:
        await client.close()
