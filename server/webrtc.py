"""The WebRTC transport of a session: peer connection, ICE, tracks and codecs, around an avatar stream.

It reads the browser's mic track into the stream (mic mode), sends the stream's clock as one video and
one audio track, and watches the connection: a peer that fails, closes or never connects ends the
session. Everything about the avatar (audio windows, generation, playback events) is the stream's
(server/avatar.py); this class knows only media in and out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from liveavatar.media_io import PcmResampler
from server.avatar import AvatarStream, Failed
from server.ice import RemoteCandidates
from server.protocol import ProtocolError
from server.rtc import apply_offer, close_peer, parse_candidate
from server.tasks import OwnedTasks, bounded
from server.tracks import ClockAudioTrack, ClockVideoTrack

log = logging.getLogger(__name__)


class WebRtcTransport:
    """One peer connection carrying one avatar stream: mic audio in, the stream's clock out."""

    def __init__(
        self,
        stream: AvatarStream,
        on_ended: Callable[[str], object],
        on_failed: Failed,
        connect_timeout_s: float = 30.0,
        mic_gap_s: float = 0.5,
    ) -> None:
        """`on_ended(reason)`: the peer is gone (the session should close); `mic_gap_s`: no mic audio for
        this long counts as silence."""
        self.stream = stream
        self.id, self.mode = stream.id, stream.mode
        self.on_ended, self.on_failed = on_ended, on_failed
        self.connect_timeout_s = connect_timeout_s
        self.mic_gap_s = mic_gap_s
        playout = stream.playout
        self.video = ClockVideoTrack(stream.clock, on_frame=playout.frame_sent, on_drop=playout.frames_skipped)
        self.audio = ClockAudioTrack(stream.clock, on_frame=playout.audio_sent)
        self.pc: RTCPeerConnection | None = None
        self.candidates: RemoteCandidates | None = None
        self.video_codec = ""
        self.mic_track: MediaStreamTrack | None = None
        self.unused_tracks = 0
        """Remote tracks the session does not read (stopped at once)."""
        self.tasks = OwnedTasks(self.id, self._task_failed)
        self.closing = False
        """Set by the owner when the session starts closing: no more candidates are taken."""
        self._peer_connected = False

    async def start(self, offer_sdp: str, rtc_config: Any, video_codec: str = "auto") -> str:
        """Answer the offer (ICE gathered in the answer) and start watching the connection."""
        self.pc = pc = RTCPeerConnection(rtc_config)
        pc.on("connectionstatechange", self._connection_changed)
        pc.on("track", self._remote_track)
        self.candidates = RemoteCandidates(pc, self.id)
        answer, self.video_codec = await apply_offer(
            pc, offer_sdp, self.mode, self.video, self.audio, video_codec, self.candidates
        )
        self.tasks.spawn(self._connect_watchdog(), "watchdog")
        return answer

    async def add_ice(self, candidate: str | None, sdp_mid: str | None, mline: int | None) -> None:
        """A trickled candidate; resolving it (mDNS) never holds this connection's messages up."""
        if self.candidates is None:
            raise ProtocolError("unknown_session", "send an offer before ICE candidates")
        parsed = parse_candidate(candidate, sdp_mid, mline)
        if not self.closing:
            self.candidates.add(parsed)

    async def close(self) -> None:
        """Stop reading and sending, close the peer connection; bounded in time, never raises."""
        self.closing = True
        await self.tasks.stop()
        timeout_s = self.tasks.timeout_s
        if self.candidates is not None:
            await bounded(self.id, self.candidates.close(), "stopping remote candidate lookups", timeout_s)
        self.video.stop()
        self.audio.stop()
        if self.pc is not None:
            pc, self.pc = self.pc, None
            await bounded(self.id, close_peer(pc), "closing the peer connection", timeout_s)
            pc.remove_all_listeners()

    @property
    def waiting_for_peer(self) -> bool:
        """Open, and its peer connection has never come up (yet)."""
        return not self._peer_connected and not self.closing

    def _task_failed(self, _task: asyncio.Task[Any], exc: BaseException) -> None:
        if not self.closing:
            message = f"the server failed and closed this session: {type(exc).__name__}: {exc}"
            self.on_failed("internal", message, "internal error")

    def _connection_changed(self) -> None:
        state = self.pc.connectionState if self.pc else "closed"
        log.info("session %s peer connection %s", self.id, state)
        if state == "connected":
            self._peer_connected = True
        if state in ("failed", "closed"):
            self.on_ended(f"peer connection {state}")

    async def _connect_watchdog(self) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if self.pc is not None and self.pc.connectionState != "connected":
            self.on_ended(f"no peer connection after {self.connect_timeout_s:.0f} s")

    def _remote_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.mode == "mic" and self.mic_track is None:
            self.mic_track = track
            self.tasks.spawn(self._read_mic(track), "mic")
            return
        # A track nobody reads (the camera a browser sends, audio in push mode): our transceivers for
        # it are sendonly, so its receiver never starts decoding; stop it so that stays explicit.
        # (check_offer refuses a second audio or video m-line, whose receiver would decode for nothing.)
        self.unused_tracks += 1
        log.info("session %s: ignoring the client's %s track", self.id, track.kind)
        track.stop()

    async def _read_mic(self, track: MediaStreamTrack) -> None:
        resampler = PcmResampler(self.stream.rate)
        while True:
            try:
                async with asyncio.timeout(self.mic_gap_s):
                    frame = await track.recv()
            except TimeoutError:  # the sender stopped (muted, network gone): that is silence, not a pause
                self.stream.mic_gap(self.mic_gap_s)
                continue
            except MediaStreamError:
                return
            pcm = resampler.resample(frame)  # type: ignore[arg-type]  # audio tracks give AudioFrames
            if pcm.size:
                self.stream.feed_mic(pcm, time.monotonic())
