"""The application: one port serving the page, `/healthz`, `/metrics` and the `/ws` signalling socket.

Plain HTTP is answered from the WebSocket server's `process_request` hook (the `websockets` package),
so there is one listener and no web framework. `SignallingServer` is that listener with everything a
connection gets before its messages mean anything (auth, origins, per-client and global limits, the
message rate, the outbox); `App` is the single-host server on top of it. Each WebSocket connection may
own one session; the sessions live in the app's `SessionRegistry`. A bad message gets an `error` reply on
its own connection and never disturbs another session. The model runs in one or more GPU sets
(`server/gpusets.py`); each session is placed on one set when it opens and stays there. A cluster
(server/cluster/) reuses both: its front door is a `SignallingServer` that relays each session to a
replica, and each replica runs an `App`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from liveavatar.generator import AvatarSpec, Generator, Size
from liveavatar.media_io import default_portrait_path
from liveavatar.version import package_version
from server import protocol as P
from server.admission import Admission
from server.avatar import describe_failure
from server.clients import ClientLimits, client_of
from server.config import ServerConfig, ice_servers, turn_urls
from server.connection import DEFAULT_PUSH_RATE, Connection
from server.gpusets import GpuSet, GpuSets, build_set
from server.load import StepGovernor
from server.metrics import Metrics
from server.model import ModelInfo
from server.portrait import decode_portrait
from server.rtc import check_offer
from server.session import Session, SessionRegistry
from server.tasks import log_task_failure
from server.turn import check_turn, rtc_configuration, turn_error_summary
from server.web import (
    CLIENT_DIR,
    CONTENT_TYPES,
    LogLimit,
    authorized,
    head_bytes,
    origin_allowed,
    response,
    static_file,
)
from server.worker import GpuWorker

log = logging.getLogger(__name__)

VERSION = package_version()

CONNECTIONS_PER_SESSION = 4
SPARE_CONNECTIONS = 8
"""Open `/ws` connections allowed: 4 per session place (the viewer, apps pushing into its session,
a reconnect in flight) plus 8 spare. Beyond that the handshake is answered 503, so idle sockets
cannot pile up without bound (each one holds buffers and a task)."""
CLOSE_SOCKETS_S = 2.0
"""At shutdown, how long the WebSockets get to finish their closing handshake."""


def connection_limit(max_sessions: int) -> int:
    return CONNECTIONS_PER_SESSION * max_sessions + SPARE_CONNECTIONS


class SignallingServer:
    """The listener of one server: the page, `/poster.png`, `/healthz`, `/metrics` and `/ws`, with the
    checks every request passes (header size, auth, origin, per-client and global connection limits) and
    the loop of each WebSocket (message rate, idle timeout, errors answered on the connection).
    Subclasses say what the messages do (`_dispatch`), what `/healthz` and `/metrics` report, what a new
    connection is told first, and what ends with a connection."""

    def __init__(self, config: ServerConfig, max_sessions: int) -> None:
        """`max_sessions`: sessions this listener may carry at once (bounds the open WebSockets)."""
        self.config = config
        self.connections: set[Connection] = set()
        self.max_connections = connection_limit(max_sessions)
        self.clients = ClientLimits(
            config.max_connections_per_client, config.max_pending_per_client, config.connect_timeout_s
        )
        self.metrics = Metrics()
        self.refusals = LogLimit(log)
        """Refused requests are logged at most once per kind every 10 s, so a flood of them cannot fill the log."""
        self.client_dir = Path(config.client_dir).resolve() if config.client_dir else CLIENT_DIR
        self.port = config.port
        self._server: Server | None = None
        self._turn_check: asyncio.Task[None] | None = None
        self.turn_error = ""
        """What the start-up TURN check found wrong (empty when it passed or has not finished)."""

    @property
    def url(self) -> str:
        host = self.config.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    async def _listen(self, port: int | None = None) -> None:
        """Open the configured port, or `port` (0: any free one; `self.port` then says which), and start
        the TURN check. Raises OSError when the port is taken."""
        cfg = self.config
        self._server = await serve(
            self._handle,
            cfg.host,
            cfg.port if port is None else port,
            process_request=self._http,
            max_size=2 * cfg.max_message_bytes,  # up to here: a JSON error; beyond: close code 1009
            compression=None,
            server_header=None,  # no library versions for scanners
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if cfg.turn_secret:
            self._turn_check = asyncio.create_task(self._check_turn())
            self._turn_check.add_done_callback(log_task_failure)

    async def _check_turn(self) -> None:
        """A wrong TURN secret fails silently in WebRTC; say so once, loudly, at start-up."""
        problems = turn_error_summary(await check_turn(turn_urls(self.config), self.config.turn_secret))
        self.turn_error = problems  # sent to every client in its config message, too
        if problems:
            log.error("TURN check failed: %s", problems)
        else:
            log.info("TURN check passed for %s", self.config.turn_url)

    async def _stop_listening(self, end_sessions: Callable[[], Awaitable[object]]) -> None:
        """Stop taking connections, run `end_sessions()` (each client gets its `closed`), then close
        the sockets, each within a bounded time (`CLOSE_SOCKETS_S`)."""
        if self._turn_check is not None:
            self._turn_check.cancel()
        if self._server is None:
            return
        self._server.server.close()  # no new connections while the sessions end
        await end_sessions()
        await asyncio.gather(*(c.drain(0.5) for c in self.connections))  # the `closed` messages
        self._server.close()
        try:
            async with asyncio.timeout(CLOSE_SOCKETS_S):
                await self._server.wait_closed()
        except TimeoutError:
            log.warning("connections still open %.0f s after closing them; stopping anyway", CLOSE_SOCKETS_S)
        self._server = None

    # ---- what subclasses say ----------------------------------------------------------------------

    async def start(self) -> None:
        """Build what serves the sessions, then listen."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop listening and let go of every session, within a bounded time."""
        raise NotImplementedError

    def describe(self) -> str:
        """What serves the sessions, for the start-up line."""
        raise NotImplementedError

    def _health(self) -> tuple[int, str]:
        """`/healthz`: (status, body)."""
        return 200, "ok\n"

    def _metrics_text(self) -> str:
        """`/metrics`: Prometheus text (exposition 0.0.4)."""
        raise NotImplementedError

    def _config_message(self) -> P.ConfigMessage:
        """The first message on every connection."""
        raise NotImplementedError

    async def _dispatch(self, conn: Connection, raw: str | bytes) -> None:
        """One client message; a refusal is raised as `P.ProtocolError` (answered on the connection)."""
        raise NotImplementedError

    def _new_connection(self, ws: ServerConnection) -> Connection:
        return Connection(ws, rate=self.config.max_messages_per_second)

    def _owns_session(self, conn: Connection) -> bool:
        return conn.session is not None

    async def _end_session_of(self, conn: Connection, reason: str) -> None:
        """End the session `conn` owns, if any: its connection closed, or a request failed in a way that
        leaves its state unknown."""
        session = conn.session
        if session is not None:
            conn.session = None
            await session.close(reason)

    # ---- HTTP -----------------------------------------------------------------------------------

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urllib.parse.urlsplit(request.path)
        path = url.path
        remote = connection.remote_address
        if (size := head_bytes(request)) > self.config.max_header_bytes:
            self.refusals.warning("headers_too_large", "bytes=%d remote=%s", size, remote)
            return connection.respond(431, f"request headers over {self.config.max_header_bytes} bytes\n")
        if path == "/healthz":
            return connection.respond(*self._health())
        if path == "/poster.png":  # the default avatar: what the page shows before Start and after Stop
            return response(await asyncio.to_thread(default_portrait_path().read_bytes), "image/png")
        if path in ("/ws", "/metrics") and not authorized(self.config.auth_tokens, request, url.query):
            self.refusals.warning("unauthorized", "path=%s remote=%s", path, remote)
            return connection.respond(
                401, "unauthorized: this server needs a token (?token=... or Authorization: Bearer)\n"
            )
        if path == "/ws":
            if not origin_allowed(self.config.allowed_origins, request.headers):
                self.refusals.warning(
                    "origin_refused", "origin=%.200s remote=%s", request.headers.get("Origin"), remote
                )
                return connection.respond(403, "forbidden: pages of this origin may not open /ws (allowed_origins)\n")
            if not self.clients.may_connect(client_of(connection)):
                self.refusals.warning("too_many_client_connections", "remote=%s", remote)
                return connection.respond(
                    429,
                    f"too many connections from this address: at most {self.clients.max_connections} open WebSockets\n",
                )
            if len(self.connections) >= self.max_connections:
                self.refusals.warning("too_many_connections", "open=%d remote=%s", len(self.connections), remote)
                return connection.respond(
                    503,
                    f"too many connections: this server takes {self.max_connections} open WebSockets; "
                    "try again later\n",
                )
            return None
        if path == "/metrics":
            return response(self._metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
        file = static_file(self.client_dir, path)
        if file is None:
            return connection.respond(404, "not found\n")
        content = await asyncio.to_thread(file.read_bytes)
        return response(content, CONTENT_TYPES.get(file.suffix, "application/octet-stream"))

    # ---- WebSocket ------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        if len(self.connections) >= self.max_connections:  # handshakes that raced past the check in _http
            await ws.close(1013, "too many connections; try again later")
            return
        conn = self._new_connection(ws)
        self.connections.add(conn)
        self.clients.opened(conn.client)
        pump = asyncio.create_task(conn.pump())
        conn.post(self._config_message())
        try:
            while (raw := await conn.next_message(self.config.idle_timeout_s)) is not None:
                if not conn.allow_message():
                    self.metrics.error("rate_limited")
                    self.refusals.warning("rate_limited", "remote=%s", ws.remote_address)
                    await conn.refuse_flood()
                    break
                try:
                    await self._dispatch(conn, raw)
                except P.ProtocolError as err:
                    self.metrics.error(err.code)
                    conn.post(err.to_message())
                except Exception as exc:
                    log.exception("request failed")
                    self.metrics.error("internal")
                    closed = " and closed this connection's session" if self._owns_session(conn) else ""
                    conn.post(P.error("internal", f"the server failed{closed}: {exc}"))
                    # its state is unknown now: end it, like other fatal errors (its `closed` follows)
                    await self._end_session_of(conn, "internal error")
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self.clients.closed(conn.client)
            for followed in list(conn.followed):
                followed.unfollow(conn)
            conn.followed.clear()
            await self._end_session_of(conn, "websocket closed")
            conn.open = False
            await asyncio.sleep(0)  # let the pump send what it can
            pump.cancel()


class App(SignallingServer):
    """The single-host server: owns the GPU sets (generator, worker, admission, governor each), the
    session registry and the metrics of one server."""

    def __init__(self, config: ServerConfig, generator: Generator | None = None) -> None:
        """`generator`: a backend built by the caller (tests), used instead of the configured one (one set)."""
        super().__init__(config, config.max_sessions)
        self.generator = generator
        """The first set's generator (the only one with one set): name, fps and sizes for every set."""
        self.model = ModelInfo(weights="given")
        self.sets = GpuSets()
        self.registry = SessionRegistry(config.max_sessions)
        self.size = Size(512, 512)
        self._portrait: np.ndarray | None = None
        self._cpu_sampler: asyncio.Task[None] | None = None

    @property
    def worker(self) -> GpuWorker | None:
        """The first set's worker (the only one with one set); None before start and after stop."""
        return self.sets[0].worker if self.sets else None

    @property
    def admission(self) -> Admission | None:
        """The first set's admission control (the only one with one set)."""
        return self.sets[0].admission if self.sets else None

    @property
    def governor(self) -> StepGovernor | None:
        """The first set's step governor (the only one with one set)."""
        return self.sets[0].governor if self.sets else None

    async def start(self) -> None:
        from liveavatar.media_io import load_image

        cfg = self.config
        if self.generator is None:
            from server.model import build_generators

            generators, self.model = await asyncio.to_thread(build_generators, cfg)
            devices: list[str] = self.model.devices
            probes: list[str | None] = list(devices)  # admission reads the free memory of its set's GPU
        else:
            generators, devices, probes = [self.generator], [self.model.device], [None]
        self.generator = gen = generators[0]
        self.size = Size.parse(cfg.size) if cfg.size else gen.default_size
        self._portrait = await asyncio.to_thread(load_image, default_portrait_path())
        several = len(generators) > 1
        self.sets = GpuSets(
            [
                build_set(i, device, g, cfg, probe, name=f"set{i}-generator" if several else "generator")
                for i, (g, device, probe) in enumerate(zip(generators, devices, probes, strict=True))
            ]
        )
        # The default avatar, encoded now on each set's helper thread: a first session that keeps it
        # opens as fast as later ones, and what that thread keeps on its GPU is there from the start.
        default = AvatarSpec(image=self._portrait, prompt="")
        prepared = await asyncio.gather(*(s.prepare(default, self.size) for s in self.sets), return_exceptions=True)
        for gset, failure in zip(self.sets, prepared, strict=True):
            if isinstance(failure, Exception):  # a head start only: a session that needs it encodes it, or says why not
                log.error("set %d: encoding the default avatar at start failed", gset.index, exc_info=failure)
        threads = self.sets[0].worker.threads
        await self._listen()
        log.info(
            "serving %s backend at %s (%s, %d worker threads, weights %s)",
            gen.name,
            self.url,
            self.size,
            threads,
            self.model.weights,
        )
        if several:
            log.info(
                "%d GPU sets (one model replica and %d worker threads each) on %s: a session runs on one set",
                len(self.sets),
                threads,
                ", ".join(self.sets.devices),
            )
        if (cpu := self.sets[0].admission.cpu) is not None:  # the preview measures what a session costs
            self._cpu_sampler = asyncio.create_task(cpu.run(lambda: len(self.registry)))

    async def stop(self) -> None:
        """Stop listening, end every session (each client gets `closed`), then close the sockets.

        Bounded in time: each `Session.close` is, and the sockets get `CLOSE_SOCKETS_S` to close."""
        if self._cpu_sampler is not None:
            self._cpu_sampler.cancel()
        await self._stop_listening(lambda: self.registry.close_all("server stopping"))
        if self.sets:
            await asyncio.to_thread(self.sets.close)

    def describe(self) -> str:
        assert self.generator is not None  # start() built it
        return f"{self.generator.name} backend"

    def _health(self) -> tuple[int, str]:
        failed = [s for s in self.sets if s.generator.failure is not None]
        if self.sets and len(failed) == len(self.sets):
            return 503, f"every GPU set has failed: {failed[0].generator.failure}\n"
        return 200, "ok\n"

    def _metrics_text(self) -> str:
        assert self.generator is not None and self.sets
        return self.metrics.render(
            self.generator.name,
            sum(s.worker.pending for s in self.sets),
            (s.snapshot() for s in self.registry),
            self.sets.snapshots(),
            self.model.realtime,
        )

    def _config_message(self) -> P.ConfigMessage:
        assert self.generator is not None
        gen = self.generator
        return P.config(
            ice_servers=ice_servers(self.config),
            ice_transport_policy=self.config.ice_transport_policy,
            turn_error=self.turn_error,
            backend=gen.name,
            # the backend builds it (liveavatar knows nothing of server.protocol);
            # test_protocol_matches_docs checks its keys
            model=cast(P.ModelFields, self.model.to_message()),
            fps=gen.fps,
            frames_per_block=gen.frames_per_block,
            size=str(self.size),
            max_lag_ms=round((1 + self.config.max_lag_blocks) * gen.frames_per_block / gen.fps * 1000),
            max_message_bytes=self.config.max_message_bytes,
            max_upload_bytes=self.config.max_upload_bytes,
            version=VERSION,
        )

    async def _dispatch(self, conn: Connection, raw: str | bytes) -> None:
        limit = self.config.max_message_bytes
        if len(raw) > limit:
            raise P.ProtocolError("message_too_large", f"message of {len(raw)} bytes; the limit is {limit}")
        if isinstance(raw, bytes):
            session = conn.live_session()
            if session is None:
                raise P.ProtocolError("unknown_session", "binary audio needs a push session on this connection")
            await session.push_pcm(_pcm(raw), conn.push_rate)
            return
        msg = P.parse_message(raw)
        if isinstance(msg, P.Offer):
            await self._open(conn, msg)
        elif isinstance(msg, P.Ice):
            await self._own(conn).add_ice(msg.candidate, msg.sdpMid, msg.sdpMLineIndex)
        elif isinstance(msg, P.Push):
            session = self._target(conn, msg.session, msg.token)
            rate = P.check_rate(msg.sample_rate if msg.sample_rate is not None else DEFAULT_PUSH_RATE)
            data = P.decode_base64(msg.audio, "push audio", "bad_audio", limit, "message_too_large")
            await session.push_pcm(_pcm(data), rate)
        elif isinstance(msg, P.PushEnd):
            await self._target(conn, msg.session, msg.token).push_end()
        elif isinstance(msg, P.Interrupt):
            await self._target(conn, msg.session, msg.token).interrupt()
        elif isinstance(msg, P.Switch):
            session = self._target(conn, msg.session, msg.token, follow=False)
            spec = await self._spec(msg.portrait, msg.prompt, session.spec)
            gset = self.sets.of(session.id)
            if gset is None:  # it ended meanwhile; its `closed` message says so
                return
            await gset.prepare(spec, self.size)
            session.switch(spec)
        elif isinstance(msg, P.Stop):
            if msg.session is not None and (conn.session is None or msg.session != conn.session.id):
                session = self._target(conn, msg.session, msg.token, follow=False)
                await session.close("stopped by another connection")
                conn.post(P.closed(session.id, "stopped by this connection"))
            elif conn.session is not None:
                await conn.session.close("stopped by the client")
                conn.session = None
        elif isinstance(msg, P.Ping):
            conn.post(P.pong())

    def _own(self, conn: Connection) -> Session:
        session = conn.live_session()
        if session is None:
            raise P.ProtocolError("unknown_session", "no session on this connection; send an offer first")
        return session

    def _target(self, conn: Connection, sid: str | None, token: str | None, follow: bool = True) -> Session:
        """The session a control message addresses: this connection's own, or another connection's
        whose capability token it presents (an app's back end driving a viewer); else `forbidden`."""
        if sid is None:
            return self._own(conn)
        session = self.registry.get(sid)
        if session is None:
            raise P.ProtocolError("unknown_session", f"no session {sid!r}")
        if session is conn.session:
            return session
        if token is None or not hmac.compare_digest(token.encode(), session.token.encode()):
            raise P.ProtocolError(
                "forbidden",
                f"session {sid!r} belongs to another connection; send its token (from its answer) to drive it",
            )
        if follow and conn.open:  # an app driving a viewer's session follows its playback
            session.follow(conn, conn.post)
            conn.followed.add(session)
        return session

    async def _spec(self, portrait: str | None, prompt: str | None, base: AvatarSpec | None = None) -> AvatarSpec:
        cfg = self.config
        image: np.ndarray | None
        if portrait:
            data = P.decode_base64(portrait, "portrait", "bad_image", cfg.max_upload_bytes, "upload_too_large")
            image = await asyncio.to_thread(decode_portrait, data, cfg.max_upload_bytes, cfg.max_image_pixels)
        else:
            image = base.image if base is not None else self._portrait
        assert image is not None
        text = prompt if prompt is not None else (base.prompt if base is not None else "")
        return AvatarSpec(image=image, prompt=text[:2000], seed=base.seed if base is not None else 0)

    async def _open(self, conn: Connection, offer: P.Offer) -> None:
        if conn.live_session() is not None:
            raise P.ProtocolError("session_exists", "this connection already has a session; send stop first")
        if len(self.registry) >= self.registry.limit:
            self.metrics.sessions_rejected += 1
            raise P.ProtocolError("server_full", f"the server is full ({self.registry.limit} sessions)")
        P.check_rate(offer.sample_rate)
        check_offer(offer.sdp, offer.mode)
        self.clients.check_pending(conn.client, self.registry)
        spec = await self._spec(offer.portrait, offer.prompt)
        assert self.sets
        sid = self._new_session_id(conn)
        try:
            gset = self.sets.place(sid, self.size)
        except P.ProtocolError:
            self.metrics.sessions_rejected += 1
            raise
        try:
            await gset.prepare(spec, self.size)
            await self._start_session(conn, offer, spec, sid, gset)
        finally:
            if conn.session is None or conn.session.id != sid:
                self.sets.release(sid)

    def _new_session_id(self, conn: Connection) -> str:
        """The id of the session `conn` opens now (a cluster replica takes the one its front door placed)."""
        return secrets.token_urlsafe(12)

    def _session_closed(self, session: Session) -> None:
        self.registry.remove(session)
        self.sets.release(session.id)

    async def _start_session(self, conn: Connection, offer: P.Offer, spec: AvatarSpec, sid: str, gset: GpuSet) -> None:
        session = Session(
            sid,
            offer.mode,
            gset.generator,
            gset.worker,
            self.metrics,
            conn.post,
            spec,
            self.size,
            vad_mode=self.config.vad_mode,
            mic_gap_s=self.config.mic_gap_s,
            max_push_seconds=self.config.max_push_seconds,
            on_closed=self._session_closed,
            max_lag_blocks=self.config.max_lag_blocks,
            steps_now=gset.steps_now if gset.governor is not None else None,
            realtime=cast("P.RealtimePlanFields | None", self.model.realtime),  # built by the backend, as model above
            connect_timeout_s=self.config.connect_timeout_s,
            client=conn.client,
        )
        gset.admission.attach(sid, session.holding_nbytes)
        try:
            self.registry.add(session)  # checked again: another offer may have won the last place
        except P.ProtocolError:
            self.metrics.sessions_rejected += 1
            raise
        self.sets.opened(sid)
        conn.session, conn.push_rate = session, offer.sample_rate
        self.metrics.sessions_total += 1
        rtc = rtc_configuration(ice_servers(self.config), relay_only=self.config.ice_transport_policy == "relay")
        try:
            answer = await session.start(offer.sdp, rtc, self.config.video_codec)
        except Exception as exc:
            conn.session = None
            await session.close("offer failed")
            if isinstance(exc, P.ProtocolError):
                raise
            code, message = describe_failure(exc)
            raise P.ProtocolError(code, f"opening the session failed: {message}") from None
        except BaseException:
            conn.session = None
            await session.close("offer failed")
            raise
        conn.post(P.answer(answer, session.id, session.token, offer.mode, session.video_codec))


def _pcm(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise P.ProtocolError("bad_audio", "PCM must be 16-bit samples (an even number of bytes)")
    return np.frombuffer(data, "<i2")
