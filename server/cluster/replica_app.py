"""A replica's server: the single-host `App` (server/app.py) behind a front door's relay.

Each replica runs the whole single-host session machinery (Session, AvatarStream, WebRtcTransport, its
GPU set's worker and admission) for its own sessions, so the peer connections live here and media flows
between the browser and this host. What differs from one host, and only that:

- Its `/ws` is the control socket the front door relays signalling to: it listens on every interface, on
  a port of `replica_ports`, and wants the replica's own bearer key (`auth_tokens`). Per-client limits
  and origins are the front door's job.
- A session is opened only under an id the front door placed here (`reserve`, called by the session's
  placement request, server/cluster/replica.py): the relayed offer's socket names it (`?session=ID`).
  A reservation holds a slot from the placement until the session ends, or until its offer is refused
  or has not come within `OFFER_TIMEOUT_S`.
- `room()` says how many more sessions it would take (slots, and its admission's memory and real-time
  checks), for the router's ranking and the autoscaler.
- When the relay of a session whose media already flows is lost (the front door died or restarted),
  the session is not ended: it plays on until its peer connection ends. A relay the replica closed
  itself (rate limit, a client that does not read) ends it as on one host.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from server import protocol as P
from server.admission import Busy
from server.app import App
from server.config import ServerConfig
from server.connection import Connection
from server.session import Session

log = logging.getLogger(__name__)

OFFER_TIMEOUT_S = 30.0
"""How long a placed session's slot waits for its relayed offer (the front door sends it at once)."""
SLOTS_RETRY_S = 30
"""`retryAfterS` when every session slot is taken: a session lasts minutes, not seconds."""
INFO_KEYS = ("backend", "model", "fps", "framesPerBlock", "size", "maxLagMs")
PATHS = ("/ws", "/healthz", "/metrics")
"""What the control port answers; the page is the front door's."""


@dataclass
class Room:
    """How many more sessions the replica would take now, and why none when none."""

    capacity: int
    sessions: int
    """Open sessions plus placed ones still opening."""
    free: int
    why: str = ""
    retry_s: int = SLOTS_RETRY_S
    headroom: float = 1.0
    """1 − the load one more session would put on the set's worker (server/load.py); 1 when unmeasured."""


class ReplicaApp(App):
    """The single-host server, taking only sessions a front door placed here (module docstring)."""

    def __init__(self, config: ServerConfig, ports: range | None = None) -> None:
        """`config`: `ServerConfig.replica_config(key)` of the front door's settings; `ports`: where the
        control socket may listen (None: any free port)."""
        super().__init__(config)
        self.ports = ports
        self.reserved: dict[str, float] = {}
        """Placed session id -> monotonic deadline for its offer."""
        self.detached: set[str] = set()
        """Sessions whose relay was lost while their media flows (they end with their peer connection)."""

    async def _listen(self, port: int | None = None) -> None:
        if port is not None or self.ports is None:
            await super()._listen(port)
            return
        for candidate in self.ports:
            try:
                await super()._listen(candidate)
                return
            except OSError:
                continue
        raise OSError(f"no free port for the replica's control socket in replica_ports {self.config.replica_ports}")

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if urllib.parse.urlsplit(request.path).path not in PATHS:
            return connection.respond(404, "not found: this is a replica's control port; open the front door\n")
        return await super()._http(connection, request)

    def problem(self) -> str:
        """Why this replica cannot serve (its control socket closed, every GPU set failed); empty when it can."""
        if self._server is None:
            return "the replica's control socket is closed"
        code, body = self._health()
        return body.strip() if code != 200 else ""

    def backend_info(self) -> dict[str, Any]:
        """The backend's side of the `config` message, which the front door (holding no model) sends on."""
        message = self._config_message()
        return {key: message[key] for key in INFO_KEYS}  # type: ignore[literal-required]

    # ---- placement --------------------------------------------------------------------------------

    def held_ids(self) -> list[str]:
        """The ids of the sessions open, plus placed ones whose offer has not opened them yet."""
        return sorted({s.id for s in self.registry} | set(self.reserved))

    def held(self) -> int:
        return len(self.held_ids())

    def room(self) -> Room:
        capacity, held = self.config.max_sessions, self.held()
        if self.sets and all(s.generator.failure is not None for s in self.sets):
            return Room(capacity, held, 0, f"its GPU set has failed: {self.sets[0].generator.failure}")
        if held >= capacity:
            return Room(capacity, held, 0, f"all {capacity} session slots are taken")
        headroom = 1.0
        if self.sets:
            gset = self.sets[0]
            block_s = gset.generator.frames_per_block / gset.generator.fps
            headroom = 1.0 - gset.worker.load.load(held + 1, block_s)
            try:
                gset.admission.check(self.size)
            except Busy as busy:
                return Room(capacity, held, 0, busy.why, busy.retry_s, headroom)
        return Room(capacity, held, capacity - held, headroom=headroom)

    def reserve(self, sid: str) -> P.ErrorMessage | None:
        """Hold a slot for session `sid` until its offer comes; the `busy` error to send when there is none."""
        self._expire()
        room = self.room()
        if room.free <= 0:
            return Busy(f"replica full ({room.why})", room.retry_s).to_message()
        self.reserved[sid] = time.monotonic() + OFFER_TIMEOUT_S
        return None

    def release(self, sid: str) -> None:
        self.reserved.pop(sid, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, deadline in list(self.reserved.items()):
            if deadline < now and self.registry.get(sid) is None:
                del self.reserved[sid]

    async def wait_open(self, sid: str) -> Session | None:
        """The session `sid` once its relayed offer opened it; None if it never did in time (refused,
        failed, or no offer came)."""
        while sid in self.reserved and time.monotonic() < self.reserved[sid]:
            session = self.registry.get(sid)
            if session is not None:
                return session
            await asyncio.sleep(0.05)
        return self.registry.get(sid)

    def _new_session_id(self, conn: Connection) -> str:
        """The id its front door placed the session under (`?session=` of the relay socket)."""
        query = urllib.parse.urlsplit(conn.ws.request.path if conn.ws.request else "").query
        sid = urllib.parse.parse_qs(query).get("session", [""])[0]
        if sid not in self.reserved or self.registry.get(sid) is not None:
            raise P.ProtocolError(
                "unknown_session",
                "this replica holds no place for that session: offers reach a replica through the cluster's front door",
            )
        return sid

    async def _open(self, conn: Connection, offer: P.Offer) -> None:
        """As on one host; an offer refused or failed frees its slot at once."""
        sid = self._new_session_id(conn)
        try:
            await super()._open(conn, offer)
        finally:
            if self.registry.get(sid) is None:
                self.release(sid)

    # ---- a lost relay -----------------------------------------------------------------------------

    def _session_closed(self, session: Session) -> None:
        super()._session_closed(session)
        self.detached.discard(session.id)
        self.release(session.id)

    async def _end_session_of(self, conn: Connection, reason: str) -> None:
        session = conn.live_session()
        # Lost, not ended: closed by the far end (not by this replica) as "going away" (a front door stopping)
        # or without a close frame (a front door or network gone). A front door that ends a session closes
        # its relay with 1000 (after `replica_lost`, or when its client left): then the session ends here too.
        relay_lost = reason == "websocket closed" and conn.open and conn.ws.close_code != 1000
        if session is not None and relay_lost and not session.waiting_for_peer:
            conn.session = None
            self.detached.add(session.id)
            log.warning(
                "session %s: its front door's relay was lost while its media flows; it plays on until its peer "
                "connection ends, and takes no more signalling",
                session.id,
            )
            return
        await super()._end_session_of(conn, reason)
