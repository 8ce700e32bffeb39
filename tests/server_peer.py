"""A Python stand-in for the browser, used by the server tests: signalling on /ws, an aiortc peer,
and a record of what arrived (messages, video frames, audio, RTCP sender reports).

Sender reports map each track's RTP timestamps to the server's wall clock (NTP); both tracks come
from one process clock, so mapping a video frame and an audio sample through their own track's
reports puts them on one time axis: that is how the tests measure A/V offset, the way a browser
lines up lips and sound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fractions
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtcpSrPacket
from av import AudioFrame

CLOCK_RATE = {"video": 90_000, "audio": 48_000}


class ArrayAudioTrack(MediaStreamTrack):
    """Plays a mono int16 array at 48 kHz in real time, 20 ms per frame, then silence (or, with `loop`,
    the array over and over, for soaks that outlast it): a fake mic."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, rate: int = 48_000, loop: bool = False) -> None:
        super().__init__()
        self.samples, self.rate, self.frame = samples.astype(np.int16), rate, rate // 50
        self.loop = loop
        self._k = 0
        self._t0: float | None = None

    async def recv(self) -> AudioFrame:
        if self._t0 is None:
            self._t0 = time.monotonic()
        delay = self._t0 + self._k * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        start = self._k * self.frame
        if self.loop:
            start %= len(self.samples) - self.frame
        chunk = self.samples[start : start + self.frame]
        chunk = np.pad(chunk, (0, self.frame - len(chunk)))
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = self.rate, self._k * self.frame
        frame.time_base = fractions.Fraction(1, self.rate)
        self._k += 1
        return frame


@dataclass
class Received:
    video: list[tuple[float, int, np.ndarray]] = field(default_factory=list)
    """(arrival monotonic, RTP timestamp, gray thumbnail)"""
    audio: list[tuple[float, int, np.ndarray]] = field(default_factory=list)
    """(arrival monotonic, RTP timestamp, mono int16 at 48 kHz)"""
    reports: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    """kind -> [(sender NTP seconds, RTP timestamp)] from RTCP sender reports"""
    rtp_origin: dict[str, int] = field(default_factory=dict)
    """kind -> RTP timestamp of the first packet; aiortc hands out frame pts relative to it"""

    def rtp(self, kind: str, pts: int) -> int:
        return (self.rtp_origin[kind] + pts) % 2**32

    def sender_time(self, kind: str, pts: int) -> float:
        """Server wall-clock time of a received frame's pts, from the median over the track's reports."""
        rate, rtp = CLOCK_RATE[kind], self.rtp(kind, pts)
        return statistics.median(ntp + _rtp_diff(rtp, sr_rtp) / rate for ntp, sr_rtp in self.reports[kind])

    def audio_signal(self) -> tuple[np.ndarray, int]:
        """All received audio concatenated, with the pts of its first sample."""
        return np.concatenate([a for _, _, a in self.audio]), self.audio[0][1]


def _rtp_diff(a: int, b: int) -> int:
    """a - b on the 32-bit RTP timestamp circle."""
    return (a - b + 2**31) % 2**32 - 2**31


class PeerClient:
    """One viewer: a WebSocket to /ws plus an aiortc peer connection that records what it receives."""

    def __init__(self, ws_url: str, thumb: int = 128, keep_video: bool = True) -> None:
        self.ws_url, self.thumb, self.keep_video = ws_url, thumb, keep_video
        self.ws: Any = None
        self.pc: RTCPeerConnection | None = None
        self.config: dict[str, Any] = {}
        self.messages: list[dict[str, Any]] = []
        self.got = Received()
        self.session: str | None = None
        self.token: str | None = None
        """The session's capability token, for another connection to drive it."""
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    async def connect(self) -> PeerClient:
        self.ws = await websockets.connect(self.ws_url, max_size=None, compression=None)
        self.config = json.loads(await self.ws.recv())
        self._tasks.append(asyncio.create_task(self._read_ws()))
        return self

    async def _read_ws(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                self.messages.append(json.loads(raw))
                self._changed.set()

    async def send(self, message: dict[str, Any] | bytes | str) -> None:
        await self.ws.send(message if isinstance(message, bytes | str) else json.dumps(message))

    async def wait_for(self, kind: str, timeout: float = 10.0, after: int = 0, **match: Any) -> dict[str, Any]:
        """The first message of `kind` (at index >= after) whose fields equal `match`."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages[after:]:
                if m.get("type") == kind and all(m.get(k) == v for k, v in match.items()):
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} message {match or ''} in {timeout} s; got {self.types()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def types(self) -> list[str]:
        return [m.get("type", "?") for m in self.messages]

    async def start(
        self,
        mode: str = "mic",
        mic: MediaStreamTrack | None = None,
        codec: str | None = None,
        rewrite: Callable[[str], str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Offer, get the answer, connect; returns the answer message. `rewrite` changes the offer
        SDP before it is sent (to play another kind of browser)."""
        self.pc = pc = RTCPeerConnection()
        if mode == "mic":
            pc.addTransceiver(mic or ArrayAudioTrack(np.zeros(48_000 * 30, np.int16)), direction="sendrecv")
        else:
            pc.addTransceiver("audio", direction="recvonly")
        video_tx = pc.addTransceiver("video", direction="recvonly")
        if codec:
            caps = RTCRtpReceiver.getCapabilities("video").codecs
            video_tx.setCodecPreferences(sorted(caps, key=lambda c: c.mimeType.lower() != f"video/{codec}"))
        pc.on("track", self._on_track)
        await pc.setLocalDescription(await pc.createOffer())
        for transceiver in pc.getTransceivers():
            _spy_sender_reports(transceiver.receiver, transceiver.kind, self.got)
        seen = len(self.messages)
        offer = pc.localDescription.sdp if rewrite is None else rewrite(pc.localDescription.sdp)
        await self.send({"type": "offer", "sdp": offer, "mode": mode, **fields})
        answer = await self.wait_for("answer", after=seen, timeout=20)
        self.session, self.token = answer["session"], answer.get("token")
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return answer

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._drain(track)))

    async def _drain(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if track.kind == "video":
                thumb = None
                if self.keep_video:
                    gray = frame.to_ndarray(format="gray")
                    thumb = cv2.resize(gray, (self.thumb, self.thumb), interpolation=cv2.INTER_AREA)
                self.got.video.append((now, frame.pts, thumb))
            else:
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]  # packed s16 -> first channel
                self.got.audio.append((now, frame.pts, pcm.astype(np.int16)))

    async def wait_frames(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.got.video) + count
        while len(self.got.video) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.got.video)} of {target} video frames in {timeout} s")
            await asyncio.sleep(0.05)

    def push_b64(self, pcm: np.ndarray, rate: int = 16_000, **fields: Any) -> dict[str, Any]:
        return {
            "type": "push",
            "audio": base64.b64encode(pcm.astype("<i2").tobytes()).decode(),
            "sample_rate": rate,
            **fields,
        }

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _spy_sender_reports(receiver: RTCRtpReceiver, kind: str, got: Received) -> None:
    """Record RTCP sender reports and the first RTP timestamp as they reach the receiver
    (aiortc keeps no RTP<->NTP mapping and rebases frame pts to the first packet)."""
    original = receiver._handle_rtcp_packet
    original_rtp = receiver._handle_rtp_packet

    async def spy_rtp(packet: Any, arrival_time_ms: int) -> None:
        got.rtp_origin.setdefault(kind, packet.timestamp)
        await original_rtp(packet, arrival_time_ms)

    async def spy(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            info = packet.sender_info
            ntp = (info.ntp_timestamp >> 32) + (info.ntp_timestamp & 0xFFFFFFFF) / 2**32
            got.reports[kind].append((ntp, info.rtp_timestamp))
        await original(packet)

    receiver._handle_rtcp_packet = spy
    receiver._handle_rtp_packet = spy_rtp


def fps_by_arrival(times: list[float], skip_s: float = 1.0) -> float:
    """Frames per second over the arrivals after the first `skip_s` (connection warm-up)."""
    steady = [t for t in times if t >= times[0] + skip_s]
    if len(steady) < 2:
        return 0.0
    return (len(steady) - 1) / (steady[-1] - steady[0])


async def offer_reply(client: PeerClient) -> dict[str, Any]:
    """Send a valid push offer (receive-only peer) and return the server's first reply to it: the
    answer, or the error (e.g. `busy`) when the session is refused."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    seen = len(client.messages)
    await client.send({"type": "offer", "sdp": pc.localDescription.sdp, "mode": "push"})
    try:
        while True:
            reply = next((m for m in client.messages[seen:] if m["type"] in ("answer", "error")), None)
            if reply is not None:
                return reply
            await asyncio.sleep(0.05)
    finally:
        await pc.close()


async def offer_sdp(audio: bool = True) -> str:
    """A valid receive-only offer (audio unless `audio=False`, and video) from a throw-away aiortc peer."""
    pc = RTCPeerConnection()
    if audio:
        pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def raw_response(app: Any, request: str) -> bytes:
    """The reply to a hand-written HTTP request (for headers urllib and websockets will not send)."""
    host, port = app.url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request.encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
