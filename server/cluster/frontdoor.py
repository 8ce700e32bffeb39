"""The cluster's front door: the same page, `/ws` protocol, auth, TURN credentials, `/healthz` and
`/metrics` as one host (server/app.py `SignallingServer`), holding no model and no peer connection.

An `offer` is placed on a replica through Ray Serve (server/cluster/replica.py, `session(sid, avoid)`,
routed by server/cluster/router.py): the replica holds a slot, or refuses, and the offer is placed again
with the refusers ranked last (`busy` when every replica refused). The front door then opens one relay
socket to that replica (server/cluster/relay.py) and sends the offer on; every later message of the
session (ice, binary PCM, push, push_end, interrupt, switch, stop) goes on that socket, and everything the
replica answers comes back on it. A message that addresses another connection's session (`session` +
`token`) goes on a relay socket of its own to that session's replica; the replica checks the token, as on
one host.

A session ends when its replica says `closed`; or, with `replica_lost` then `closed`, when its
placement request fails (its replica or node died, or it outlived its replica's drain deadline) or its
relay socket drops while the session is open, whichever comes first. Only that session ends.

The front door keeps no state a replica needs: if it stops (or dies), sessions whose media flows play on
on their replicas; their signalling is gone with it, and a restarted front door answers messages for
them `unknown_session`, saying why.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, cast

from ray.exceptions import RayActorError
from websockets.asyncio.server import ServerConnection

from server import protocol as P
from server.admission import Busy
from server.app import VERSION, SignallingServer
from server.cluster import deploy
from server.cluster.registry import REPORT_S, ReplicaReport
from server.cluster.relay import Upstream
from server.cluster.view import Placements, health, render
from server.config import ServerConfig, ice_servers
from server.connection import Connection
from server.rtc import check_offer
from server.tasks import log_task_failure
from server.web import LogLimit

log = logging.getLogger(__name__)

PLACE_TIMEOUT_S = 10.0
"""How long an offer waits for a replica to hold it a slot (none ready: all starting or replaced)."""
NO_REPLICA_RETRY_S = 30
START_TIMEOUT_S = 120.0
"""How long start-up waits for the first replica's report (serve.run already waited for it to be ready)."""
STOP = '{"type":"stop"}'
ENDED_GRACE_S = 2.0
"""After a session's placement request ended, how long its replica's `closed` may take to arrive."""


@dataclass(eq=False)
class RelayedSession:
    """A session this front door placed and relays."""

    id: str
    conn: FrontConnection
    client: str
    """Remote address of the connection that opened it (per-client limits)."""
    offered: float
    """Monotonic time its offer arrived."""
    placement: dict[str, Any] = field(default_factory=dict)
    """Where it runs: replica, actor, node, host, url, key (server/cluster/replica.py)."""
    upstream: Upstream | None = None
    request: Any = None
    """Its placement request (a Serve `DeploymentResponseGenerator`), open as long as the session."""
    watcher: asyncio.Task[None] | None = None
    answered: bool = False
    connected: bool = False
    """Its peer connection is up (the replica said so)."""
    token: str = ""
    """Its capability token, from its `answer`: another connection must show it before a relay socket to
    the session's replica is opened for it."""
    over: bool = False

    @property
    def waiting_for_peer(self) -> bool:
        return not self.connected and not self.over


class FrontConnection(Connection):
    """A client's WebSocket at the front door: its own session runs on a replica."""

    def __init__(self, ws: ServerConnection, rate: float) -> None:
        super().__init__(ws, rate=rate)
        self.relay: RelayedSession | None = None
        self.followers: dict[str, Upstream] = {}
        """Relay sockets to replicas of other connections' sessions this one drives, by replica url."""

    def has_live_session(self) -> bool:
        return self.relay is not None and not self.relay.over


class FrontDoor(SignallingServer):
    """The front door of the Serve application `config.cluster_app` on the Ray cluster `config.cluster`."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config, config.cluster_sessions)
        self.sessions: dict[str, RelayedSession] = {}
        """Every session placed through this front door and not over, by id."""
        self.reports: list[ReplicaReport] = []
        """The replicas' latest reports (at most one period old)."""
        self.info: dict[str, Any] = {}
        """The backend's side of the `config` message, from the newest replica."""
        self.placements = Placements()
        self.deployed = False
        """Whether this front door deployed the application (else it attached to a running one)."""
        self.leave_sessions = False
        """Stopping, sessions are left to play on on their replicas (a restart)."""
        self._avatars: Any = None
        self._registry: Any = None
        self._refresher: asyncio.Task[None] | None = None
        self._registry_failures = LogLimit(log, interval_s=60.0)
        """The registry restarting is said once a minute, not at every refresh."""

    @property
    def backend(self) -> str:
        return str(self.info.get("backend", "?"))

    async def start(self) -> None:
        cfg = self.config
        await asyncio.to_thread(deploy.connect, cfg.cluster)
        self.deployed = await asyncio.to_thread(deploy.deploy, cfg)
        self._avatars, self._registry = await asyncio.to_thread(deploy.handles, cfg)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.info:
            await self._refresh()
            if not self.info:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no replica of {cfg.cluster_app!r} reported in {START_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.2)
        self._refresher = asyncio.create_task(self._refresh_every(REPORT_S), name="cluster-view")
        self._refresher.add_done_callback(log_task_failure)
        await self._listen()
        log.info(
            "front door of %r at %s: %s backend, %d replicas ready on %d hosts (%s)",
            cfg.cluster_app,
            self.url,
            self.backend,
            len(self.reports),
            len({r["node"] for r in self.reports}),
            "deployed" if self.deployed else "attached",
        )

    def describe(self) -> str:
        hosts = len({r["node"] for r in self.reports})
        return (
            f"cluster front door: {self.backend} backend, {len(self.reports)} replicas on {hosts} hosts, "
            f"Serve application {self.config.cluster_app!r}"
        )

    async def stop(self, end_sessions: bool = False) -> None:
        """Stop taking connections and close every relay socket as "going away": sessions whose media flows
        play on on their replicas (a restart keeps them); sessions still opening end there. With
        `end_sessions`, every session is stopped instead, as one host stopping does."""
        self.leave_sessions = not end_sessions
        if self._refresher is not None:
            self._refresher.cancel()

        async def let_go() -> None:
            for relayed in list(self.sessions.values()):
                if end_sessions and relayed.upstream is not None:
                    await relayed.upstream.send(STOP)
                relayed.over = True
                if relayed.watcher is not None:
                    relayed.watcher.cancel()
                if relayed.upstream is not None:
                    await relayed.upstream.close(1000 if end_sessions else 1001, "front door stopping")
            for conn in list(self.connections):  # a client leaving meanwhile changes the set
                await self._close_followers(cast(FrontConnection, conn))

        await self._stop_listening(let_go)

    # ---- the cluster view -------------------------------------------------------------------------

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(2 * REPORT_S):
                self.reports = await self._registry.replicas.remote()
        except Exception as exc:  # the registry restarting: keep the last view, and say so now and then
            self._registry_failures.warning("registry_unreadable", "cannot read the registry of replicas: %r", exc)
            return
        if self.reports:
            self.info = self.reports[-1]["info"]

    async def _refresh_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            await self._refresh()

    def _health(self) -> tuple[int, str]:
        return health(self.reports)

    def _metrics_text(self) -> str:
        return render(self.backend, self.metrics, self.placements, len(self.sessions), self.reports)

    def _config_message(self) -> P.ConfigMessage:
        info = self.info
        return P.config(
            ice_servers=ice_servers(self.config),
            ice_transport_policy=self.config.ice_transport_policy,
            turn_error=self.turn_error,
            backend=info["backend"],
            model=info["model"],
            fps=info["fps"],
            frames_per_block=info["framesPerBlock"],
            size=info["size"],
            max_lag_ms=info["maxLagMs"],
            max_message_bytes=self.config.max_message_bytes,
            max_upload_bytes=self.config.max_upload_bytes,
            version=VERSION,
        )

    # ---- messages ---------------------------------------------------------------------------------

    def _new_connection(self, ws: ServerConnection) -> Connection:
        return FrontConnection(ws, rate=self.config.max_messages_per_second)

    def _owns_session(self, conn: Connection) -> bool:
        return conn.has_live_session()

    async def _dispatch(self, conn: Connection, raw: str | bytes) -> None:
        conn = cast(FrontConnection, conn)
        limit = self.config.max_message_bytes
        if len(raw) > limit:
            raise P.ProtocolError("message_too_large", f"message of {len(raw)} bytes; the limit is {limit}")
        if isinstance(raw, bytes):
            await self._send(self._own(conn, "binary audio needs a push session on this connection"), raw)
            return
        msg = P.parse_message(raw)
        if isinstance(msg, P.Offer):
            await self._open(conn, msg, raw)
        elif isinstance(msg, P.Ping):
            conn.post(P.pong())
        elif isinstance(msg, P.Ice):
            await self._send(self._own(conn), raw)
        else:  # push, push_end, interrupt, switch, stop: this connection's session or, with a token, another's
            target = msg.session
            own = conn.relay if conn.has_live_session() else None
            if target is None or (own is not None and target == own.id):
                await self._send(self._own(conn), raw)
            else:
                await self._to_other(conn, target, getattr(msg, "token", None), raw)

    def _own(self, conn: FrontConnection, why: str = "no session on this connection; send an offer first") -> Upstream:
        relayed = conn.relay
        if relayed is None or relayed.over or relayed.upstream is None:
            raise P.ProtocolError("unknown_session", why)
        return relayed.upstream

    async def _send(self, upstream: Upstream, raw: str | bytes) -> None:
        await upstream.send(raw)  # a socket already gone says so through its on_closed (replica_lost)

    async def _to_other(self, conn: FrontConnection, sid: str, token: str | None, raw: str) -> None:
        relayed = self.sessions.get(sid)
        if relayed is None or relayed.over or not relayed.placement:
            raise P.ProtocolError(
                "unknown_session",
                f"no session {sid!r} at this front door: it ended, or it was opened through a front door that has "
                "restarted since (such a session plays on on its replica until its peer connection ends, but takes "
                "no more signalling); start a new session",
            )
        # Checked here too (the replica checks again): a socket to the replica is opened only for a client
        # that holds the session's token, so guessed session ids cannot use up the replica's control port.
        if not relayed.token or not hmac.compare_digest(str(token or ""), relayed.token):
            raise P.ProtocolError("forbidden", f"session {sid} belongs to another connection; send its token")
        url = relayed.placement["url"]
        upstream = conn.followers.get(url)
        if upstream is None:
            upstream = await self._connect(relayed.placement, conn, None)
            conn.followers[url] = upstream
        await self._send(upstream, raw)

    # ---- opening a session ------------------------------------------------------------------------

    async def _open(self, conn: FrontConnection, offer: P.Offer, raw: str) -> None:
        if conn.has_live_session():
            raise P.ProtocolError("session_exists", "this connection already has a session; send stop first")
        P.check_rate(offer.sample_rate)
        check_offer(offer.sdp, offer.mode)  # before a slot is held anywhere, as on one host
        self.clients.check_pending(conn.client, self.sessions.values())
        relayed = RelayedSession(secrets.token_urlsafe(12), conn, conn.client, time.monotonic())
        self.sessions[relayed.id] = relayed
        conn.relay = relayed
        try:
            relayed.placement = await self._place(relayed)
            self.placements.placed(time.monotonic() - relayed.offered)
            relayed.upstream = await self._connect(relayed.placement, conn, relayed)
        except BaseException:
            await self._finish(relayed)
            raise
        if relayed.over:  # its relay socket dropped already: _lost told the client
            return
        self.metrics.sessions_total += 1
        log.info(
            "session %s placed on replica %s (host %s) in %.0f ms",
            relayed.id,
            relayed.placement["replica"],
            relayed.placement["host"],
            (time.monotonic() - relayed.offered) * 1000,
        )
        relayed.watcher = asyncio.create_task(self._watch(relayed), name=f"watch-{relayed.id}")
        relayed.watcher.add_done_callback(log_task_failure)
        await self._send(relayed.upstream, raw)

    async def _place(self, relayed: RelayedSession) -> dict[str, Any]:
        """A slot on the replica with the most room: its placement, or `busy` (every replica asked refused,
        or none is ready).

        The router ranks by stats that may be a moment old, and another front door may fill a replica at
        the same time, so a replica that refuses is not the cluster's answer while another may have room:
        the offer is placed again with the refusers ranked last (`avoid`), until a replica holds it, the
        router has no other to offer, or every replica in the registry has refused (at most the
        registry's count + 2 asks, for a registry that is empty or behind)."""
        known = {r["replica"] for r in self.reports}
        refusers: list[str] = []
        while True:
            first = await self._place_once(relayed, tuple(refusers))
            if "refused" not in first:
                return first
            relayed.request.cancel()  # it ends by itself after a refusal; said here, not left to chance
            refusal, replica = first["refused"], first.get("replica", "")
            asked = {*refusers, replica}
            # The router offering a refuser again means it has no other candidate; every replica the
            # registry knows refused; or a cap, for a registry that is empty or behind.
            if replica in refusers or (known and known <= asked) or len(asked) >= len(known) + 2:
                self.metrics.sessions_rejected += 1
                raise P.ProtocolError("busy", refusal["message"], refusal.get("retryAfterS"))
            log.info("session %s: replica %s refused (%s); placing it again", relayed.id, replica, refusal["message"])
            refusers.append(replica)

    async def _place_once(self, relayed: RelayedSession, avoid: tuple[str, ...]) -> dict[str, Any]:
        """One placement request: its first item (a placement or a refusal); `busy` when no replica
        answers in time or the chosen one died."""
        request = self._avatars.options(stream=True).session.remote(relayed.id, avoid=avoid)
        relayed.request = request
        try:
            async with asyncio.timeout(PLACE_TIMEOUT_S):
                first: dict[str, Any] = await request.__anext__()
        except TimeoutError:
            self.metrics.sessions_rejected += 1
            raise Busy(
                f"no replica is ready to take a session (all starting or replaced) after {PLACE_TIMEOUT_S:.0f} s",
                NO_REPLICA_RETRY_S,
            ) from None
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError: it died as it was chosen
            self.metrics.sessions_rejected += 1
            raise Busy(f"the replica chosen for this session went away ({type(exc).__name__})", 5) from None
        return first

    async def _connect(
        self, placement: dict[str, Any], conn: FrontConnection, relayed: RelayedSession | None
    ) -> Upstream:
        """A relay socket to the replica of `placement`: for `relayed` (its own session), or, without it,
        for the sessions of that replica `conn` drives by token."""

        async def on_message(message: dict[str, Any]) -> None:
            await self._from_replica(conn, relayed, message)

        async def on_closed(code: int | None, reason: str) -> None:
            if relayed is None:
                conn.followers.pop(placement["url"], None)
            elif not relayed.over:
                await self._lost(relayed, f"its relay socket closed (code {code}{': ' + reason if reason else ''})")

        try:
            return await Upstream.open(
                placement["url"],
                placement["key"],
                on_message,
                on_closed,
                session=relayed.id if relayed is not None else None,
                max_size=2 * self.config.max_message_bytes,
            )
        except Exception as exc:
            log.error("cannot reach replica %s at %s: %r", placement["replica"], placement["url"], exc)
            raise P.ProtocolError(
                "replica_lost",
                f"the replica placed for this session cannot be reached ({type(exc).__name__}); start a new session",
            ) from None

    # ---- a session's life -------------------------------------------------------------------------

    async def _from_replica(
        self, conn: FrontConnection, relayed: RelayedSession | None, message: dict[str, Any]
    ) -> None:
        """A message from a replica for `conn`'s client (`relayed`: on the session's own relay socket)."""
        kind = message.get("type")
        if kind == "error":
            self.metrics.error(str(message.get("code")))
            if relayed is not None and not relayed.answered and message.get("code") == "busy":
                self.metrics.sessions_rejected += 1  # the replica's admission refused the offer
        conn.post(cast(P.ServerMessage, message))  # built by the replica with server/protocol.py's constructors
        if relayed is None or relayed.over:
            return
        if kind == "answer" and message.get("session") == relayed.id:
            relayed.answered = True
            relayed.token = str(message.get("token") or "")
            self.placements.answered(time.monotonic() - relayed.offered)
        elif (kind == "closed" and message.get("session") == relayed.id) or (kind == "error" and not relayed.answered):
            await self._finish(relayed)  # ended on its replica, or its offer was refused there

    async def _watch(self, relayed: RelayedSession) -> None:
        """Follow the session's placement request to its end; its failure is the replica's."""
        try:
            async for item in relayed.request:
                if item.get("connected"):
                    relayed.connected = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not relayed.over:
                await self._lost(relayed, f"{type(exc).__name__}: {_first_line(exc)}")
            return
        await asyncio.sleep(ENDED_GRACE_S)  # it ended on its replica: the `closed` is on its way
        if not relayed.over:
            relayed.conn.post(P.closed(relayed.id, "ended on its replica"))
            await self._finish(relayed)

    async def _lost(self, relayed: RelayedSession, why: str) -> None:
        """The session's replica is gone: tell its client (`replica_lost`, then `closed`) and end it here."""
        if relayed.over:
            return
        place = relayed.placement
        log.warning(
            "session %s lost with replica %s (host %s) after %.1f s: %s",
            relayed.id,
            place.get("replica"),
            place.get("host"),
            time.monotonic() - relayed.offered,
            why,
        )
        self.metrics.error("replica_lost")
        relayed.conn.post(
            P.error(
                "replica_lost",
                f"the replica running session {relayed.id} is gone ({why}); start a new session",
            )
        )
        relayed.conn.post(P.closed(relayed.id, "replica lost"))
        await self._finish(relayed)

    async def _finish(self, relayed: RelayedSession) -> None:
        """The session is over here: forget it, close its relay socket, end its placement request."""
        relayed.over = True
        self.sessions.pop(relayed.id, None)
        if relayed.conn.relay is relayed:
            relayed.conn.relay = None
        if relayed.watcher is not None and relayed.watcher is not asyncio.current_task():
            relayed.watcher.cancel()
        if relayed.request is not None:
            relayed.request.cancel()
        if relayed.upstream is not None:
            await relayed.upstream.close()

    async def _end_session_of(self, conn: Connection, reason: str) -> None:
        """The client's connection closed (or a request failed): stop its session on the replica, as one host
        does. While the front door itself stops, sessions are left to play on instead (`stop`)."""
        conn = cast(FrontConnection, conn)
        relayed = conn.relay
        if relayed is not None and not relayed.over and not self.leave_sessions:
            if relayed.upstream is not None:
                await relayed.upstream.send(STOP)
            await self._finish(relayed)
        if reason == "websocket closed":
            await self._close_followers(conn)

    async def _close_followers(self, conn: FrontConnection) -> None:
        for upstream in list(conn.followers.values()):
            await upstream.close()
        conn.followers.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
