"""One viewer's session: an avatar stream (server/avatar.py) and the transport that carries it
(server/webrtc.py), with what the app needs around them: id and token, the connection's `post`,
followers, and cleanup.

Sessions live in a `SessionRegistry` owned by the app; whatever ends a session (stop, WebSocket closed,
ICE failed/closed, no connection in time, an error in either half) goes through `close()`, which
releases everything exactly once: the transport and the stream each stop their own tasks and free
what they hold, within a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from liveavatar.generator import AvatarSpec, Generator, Size
from server import protocol as P
from server.avatar import AvatarStream
from server.metrics import Metrics, SessionSnapshot
from server.protocol import ProtocolError
from server.webrtc import WebRtcTransport
from server.worker import GpuWorker

log = logging.getLogger(__name__)
Post = Callable[[P.ServerMessage], None]
PLAYBACK = frozenset({"started", "finished"})
"""Events that followers (other connections pushing into the session) get too."""


class Session:
    """Everything one peer uses; created by the app, registered in the registry, closed once."""

    def __init__(
        self,
        sid: str,
        mode: str,
        generator: Generator,
        worker: GpuWorker,
        metrics: Metrics,
        post: Post,
        spec: AvatarSpec,
        size: Size,
        vad_mode: int = 2,
        max_push_seconds: float = 120.0,
        connect_timeout_s: float = 30.0,
        on_closed: Callable[[Session], None] | None = None,
        max_lag_blocks: float = 2.0,
        steps_now: Callable[[], int] | None = None,
        realtime: P.RealtimePlanFields | None = None,
        mic_gap_s: float = 0.5,
        client: str = "",
    ) -> None:
        """The stream's settings (server/avatar.py) and the transport's (`connect_timeout_s`,
        `mic_gap_s`: server/webrtc.py)."""
        self.id, self.mode = sid, mode
        self.token = secrets.token_urlsafe(18)
        """Capability token: what another connection must show to drive this session (docs/protocol.md)."""
        self.metrics, self.post = metrics, post
        self.on_closed = on_closed
        self.client = client
        """Remote address of the connection that opened it (per-client limits)."""
        self.stream = AvatarStream(
            sid,
            mode,
            generator,
            worker,
            metrics,
            self._event,
            spec,
            size,
            self._failed,
            vad_mode=vad_mode,
            max_push_seconds=max_push_seconds,
            max_lag_blocks=max_lag_blocks,
            steps_now=steps_now,
            realtime=realtime,
        )
        self.transport = WebRtcTransport(
            self.stream, self.begin_close, self._failed, connect_timeout_s=connect_timeout_s, mic_gap_s=mic_gap_s
        )
        self.closed = asyncio.Event()
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self._followers: dict[object, Post] = {}
        """Other connections that push into this session: they get its `started` / `finished` too."""

    @property
    def spec(self) -> AvatarSpec:
        return self.stream.spec

    @property
    def video_codec(self) -> str:
        return self.transport.video_codec

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, offer_sdp: str, rtc_config: Any, video_codec: str = "auto") -> str:
        """Open the generator state, answer the offer (ICE gathered in the answer), start the loops."""
        await self.stream.open()
        answer = await self.transport.start(offer_sdp, rtc_config, video_codec)
        self.stream.start()
        log.info("session %s opened (%s mode, %s, %s)", self.id, self.mode, self.video_codec, self.stream.size)
        return answer

    async def add_ice(self, candidate: str | None, sdp_mid: str | None, mline: int | None) -> None:
        await self.transport.add_ice(candidate, sdp_mid, mline)

    async def close(self, reason: str) -> None:
        """Release everything this session holds; safe to call from anywhere, any number of times.

        Returns within a bounded time (see server/tasks.py CLOSE_TIMEOUT_S). The work runs in a task of
        its own, so a caller that is cancelled meanwhile (even one of the session's own tasks) cannot
        leave the session half closed."""
        await asyncio.shield(self.begin_close(reason))

    def begin_close(self, reason: str) -> asyncio.Task[None]:
        """Start closing (once; later reasons are ignored) without waiting; returns the closing task."""
        if self._closer is None:
            self._closing = self.stream.closing = self.transport.closing = True
            self._closer = asyncio.create_task(self._close(reason), name=f"close-{self.id}")
            self._closer.add_done_callback(_log_close_failure)
        return self._closer

    async def _close(self, reason: str) -> None:
        log.info("session %s closing: %s", self.id, reason)
        try:  # both halves are bounded in time and log their own failures
            await asyncio.gather(self.transport.close(), self.stream.close())
        finally:  # whatever failed or hung above, the session is over for its client and the server
            self._followers.clear()
            self.closed.set()
            self.post(P.closed(self.id, reason))
            if self.on_closed:
                self.on_closed(self)

    def _failed(self, code: str, message: str, reason: str) -> None:
        """Either half cannot go on: tell the client and the metrics, and end the session."""
        self.metrics.error(code)
        self.post(P.error(code, message))
        self.begin_close(reason)

    @property
    def waiting_for_peer(self) -> bool:
        """Open, and its peer connection has never come up (yet)."""
        return self.transport.waiting_for_peer and not self._closing

    # ---- input (from this or another connection) --------------------------------------------------

    async def push_pcm(self, pcm: np.ndarray, rate: int) -> None:
        await self.stream.push(pcm, rate)

    async def push_end(self) -> None:
        await self.stream.push_end()

    async def interrupt(self) -> None:
        await self.stream.interrupt()

    def switch(self, spec: AvatarSpec) -> None:
        self.stream.switch(spec)

    # ---- events ---------------------------------------------------------------------------------

    def follow(self, key: object, post: Post) -> None:
        """Send this session's playback events (`started`, `finished`) to `post` too, until unfollow."""
        self._followers[key] = post

    def unfollow(self, key: object) -> None:
        self._followers.pop(key, None)

    def _event(self, message: P.ServerMessage) -> None:
        self.post(message)
        if message.get("type") in PLAYBACK:
            for post in list(self._followers.values()):
                post(message)

    # ---- reporting ------------------------------------------------------------------------------

    def snapshot(self) -> SessionSnapshot:
        return self.stream.snapshot()

    def holding_nbytes(self) -> int:
        return self.stream.holding_nbytes()


def _log_close_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("closing a session failed", exc_info=task.exception())


class SessionRegistry:
    """The app's sessions by id, with the configured limit; the only place sessions are kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sessions: dict[str, Session] = {}

    def add(self, session: Session) -> None:
        if len(self._sessions) >= self.limit:
            raise ProtocolError("server_full", f"the server is full ({self.limit} sessions); try again later")
        self._sessions[session.id] = session

    def remove(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def get(self, sid: str) -> Session | None:
        return self._sessions.get(sid)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in self), return_exceptions=True)
