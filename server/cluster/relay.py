"""One WebSocket from the front door to a replica's control socket (server/cluster/replica_app.py).

It carries one client connection's signalling for one session placed on that replica (`session` given:
the replica opens the relayed offer under that id), or for the sessions on that replica the client
drives by their token. Client frames go up unchanged (the replica parses and checks them exactly as a
single host does); every message the replica sends back, except its greeting `config`, goes to the
client. When the socket closes, `on_closed(code, reason)` says so once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from server.tasks import log_task_failure

log = logging.getLogger(__name__)

OnMessage = Callable[[dict[str, Any]], Awaitable[None]]
OnClosed = Callable[[int | None, str], Awaitable[None]]
CONNECT_TIMEOUT_S = 5.0


class Upstream:
    """The relay socket; `open()` connects it and starts reading."""

    def __init__(self, ws: ClientConnection, url: str, on_message: OnMessage, on_closed: OnClosed) -> None:
        self.ws, self.url = ws, url
        self.on_message, self.on_closed = on_message, on_closed
        self.closing = False
        """Closed on purpose by the front door (not lost)."""
        self._reader = asyncio.create_task(self._read(), name=f"relay-{url}")
        self._reader.add_done_callback(log_task_failure)

    @classmethod
    async def open(
        cls,
        url: str,
        key: str,
        on_message: OnMessage,
        on_closed: OnClosed,
        session: str | None = None,
        max_size: int | None = None,
    ) -> Upstream:
        """Connect to `url` with the replica's bearer `key`; raises OSError, TimeoutError or websockets'
        InvalidHandshake when the replica cannot be reached."""
        target = url + ("?" + urllib.parse.urlencode({"session": session}) if session else "")
        ws = await websockets.connect(
            target,
            additional_headers={"Authorization": f"Bearer {key}"},
            max_size=max_size,
            compression=None,
            open_timeout=CONNECT_TIMEOUT_S,
        )
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await ws.recv()  # the replica's greeting `config`: the client got the front door's own
        except BaseException:
            await ws.close()
            raise
        return cls(ws, url, on_message, on_closed)

    async def send(self, data: str | bytes) -> bool:
        """Send a client frame on; False when the socket is already gone (`on_closed` reports that)."""
        try:
            await self.ws.send(data)
            return True
        except ConnectionClosed:
            return False

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close on purpose (`on_closed` still runs, with `closing` set), waiting for the reader to end."""
        self.closing = True
        await self.ws.close(code, reason)
        if self._reader is not asyncio.current_task():
            await asyncio.wait([self._reader], timeout=CONNECT_TIMEOUT_S)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                try:
                    message = json.loads(raw)
                except ValueError:
                    log.warning("relay %s: a frame that is not JSON, dropped", self.url)
                    continue
                if isinstance(message, dict):
                    await self.on_message(message)
        except ConnectionClosed:
            pass
        finally:
            await self.on_closed(self.ws.close_code, self.ws.close_reason or "")
