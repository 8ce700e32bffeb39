"""One signalling WebSocket: its outbox (drained by its own task, so callbacks never await) and the
session it owns. A client that stops reading loses its periodic `stats` first, never a control message.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from server import protocol as P
from server.clients import client_of
from server.session import Session

log = logging.getLogger(__name__)

DEFAULT_PUSH_RATE = 16_000
"""Rate of pushed PCM when neither the `push` message nor (for binary frames) the offer names one."""

OUTBOX_LIMIT = 256
DROPPABLE = frozenset({"stats"})
"""Messages a full outbox may drop (periodic: the next one says the same, newer); all others are
control messages (answer, error, closed, started, finished, switched, ...), never dropped."""


class Connection:
    """One WebSocket: an outbox drained by its own task (so callbacks never await), and its session."""

    def __init__(self, ws: ServerConnection, limit: int = OUTBOX_LIMIT, rate: float = 200.0) -> None:
        """`rate`: messages a second the client may send, in bursts of up to 5 s worth."""
        self.ws = ws
        self.client = client_of(ws)
        """The remote address, for the per-client limits."""
        self.rate = rate
        self._allowance = 5 * rate
        self._checked = time.monotonic()
        self.session: Session | None = None
        self.push_rate = DEFAULT_PUSH_RATE
        self.outbox: deque[P.ServerMessage] = deque()
        self.limit = limit
        self.open = True
        """False once the connection is over (or being closed): nothing more is queued."""
        self.followed: weakref.WeakSet[Session] = weakref.WeakSet()
        """Sessions of other connections this one pushes into (it gets their playback events)."""
        self.dropped = 0
        self._ready = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None

    def post(self, message: P.ServerMessage) -> None:
        """Queue a message. A full outbox (a client that stopped reading) drops its oldest `stats`
        first; with only control messages queued the connection is closed instead of losing one."""
        if not self.open:
            return
        if len(self.outbox) >= self.limit and not self._make_room(message):
            return
        self.outbox.append(message)
        self._ready.set()

    def _make_room(self, message: P.ServerMessage) -> bool:
        """True when there is room for `message` now."""
        kind = message.get("type")
        old = next((i for i, m in enumerate(self.outbox) if m.get("type") in DROPPABLE), None)
        if old is not None or kind in DROPPABLE:
            if old is not None:
                del self.outbox[old]
            self.dropped += 1
            if self.dropped == 1:
                log.warning("outbox of %s full (client not reading); dropping stats", self._peer())
            return old is not None
        log.error(
            "outbox of %s full of control messages (client not reading); closing the connection rather "
            "than dropping a %s message",
            self._peer(),
            kind,
        )
        self.open = False
        self.close_socket(1008, "client does not read its messages")
        return False

    def close_socket(self, code: int, reason: str) -> None:
        """Close the WebSocket without waiting (from callbacks); the handler then ends the session."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(self.ws.close(code, reason))
            self._closer.add_done_callback(_retrieve)

    def _peer(self) -> str:
        return str(getattr(self.ws, "remote_address", "?"))

    def allow_message(self) -> bool:
        """Count one received message against the rate (a token bucket); False once it is exceeded."""
        now = time.monotonic()
        self._allowance = min(5 * self.rate, self._allowance + (now - self._checked) * self.rate) - 1
        self._checked = now
        return self._allowance >= 0

    async def next_message(self, idle_timeout_s: float) -> str | bytes | None:
        """The next frame; None after closing a connection that sat idle for `idle_timeout_s` with no
        live session of its own (a socket held open for nothing takes a place from real viewers)."""
        while True:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    return await self.ws.recv()  # cancelling recv loses nothing (websockets)
            except TimeoutError:
                if not self.has_live_session():
                    await self.ws.close(1000, f"idle: no session and no message for {idle_timeout_s:g} s")
                    return None

    async def refuse_flood(self) -> None:
        """Over the message rate: say so, then close (code 1008)."""
        self.post(P.error("rate_limited", f"more than {self.rate:g} messages a second; this connection is closed"))
        await self.drain(1.0)
        self.open = False
        await self.ws.close(1008, "message rate limit")

    async def drain(self, timeout: float) -> None:
        """Until the outbox is sent (or `timeout`), e.g. an error before the connection is closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.outbox and self.open and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def live_session(self) -> Session | None:
        s = self.session
        return s if s is not None and not s.closed.is_set() else None

    def has_live_session(self) -> bool:
        """A session of its own is open here; a connection without one may be closed for idling. (A cluster
        front door's connection holds no `Session`: its session runs on a replica, server/cluster/.)"""
        return self.live_session() is not None

    async def pump(self) -> None:
        """Send the outbox in order. If sending fails for any reason but a closed socket (a bug), the
        client can no longer be told anything: log it and close the socket, which ends its session."""
        try:
            while True:
                while not self.outbox:
                    self._ready.clear()
                    await self._ready.wait()
                await self.ws.send(P.dumps(self.outbox.popleft()))
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("sending to %s failed; closing its connection", self._peer())
            self.open = False
            self.close_socket(1011, "internal error")


def _retrieve(task: asyncio.Future[None]) -> None:
    """Done callback: a failed close of a socket that is going anyway is worth a debug line at most."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing a WebSocket failed: %r", task.exception())
