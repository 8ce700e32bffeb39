"""Per-client limits: what one remote address may hold of the server.

The global caps (open WebSockets, `max_sessions`) protect the server, but one client alone can fill
them: idle sockets lock every new viewer out, and a few offers that never finish ICE keep every
session place taken. So each remote address may hold at most `max_connections_per_client` open
WebSockets and `max_pending_per_client` sessions still waiting for their peer connection. Behind a
reverse proxy every client has the proxy's address: raise the limits there (docs/configuration.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

from server.protocol import ProtocolError


class PendingSession(Protocol):
    client: str

    @property
    def waiting_for_peer(self) -> bool: ...


def client_of(connection: Any) -> str:
    """The remote address of a `websockets` connection (its IP, without the port)."""
    address = getattr(connection, "remote_address", None)
    return str(address[0]) if isinstance(address, tuple) and address else "?"


class ClientLimits:
    """Counts each client's open WebSockets; checks its sessions waiting for ICE. 0 means no limit."""

    def __init__(self, max_connections: int, max_pending: int, connect_timeout_s: float) -> None:
        self.max_connections, self.max_pending = max_connections, max_pending
        self.connect_timeout_s = connect_timeout_s
        self.open: Counter[str] = Counter()

    def may_connect(self, client: str) -> bool:
        return not self.max_connections or self.open[client] < self.max_connections

    def opened(self, client: str) -> None:
        self.open[client] += 1

    def closed(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]

    def check_pending(self, client: str, sessions: Iterable[PendingSession]) -> None:
        """Refuse another offer from a client whose earlier sessions have not connected yet."""
        if not self.max_pending:
            return
        waiting = sum(1 for s in sessions if s.client == client and s.waiting_for_peer)
        if waiting >= self.max_pending:
            raise ProtocolError(
                "too_many_pending",
                f"{waiting} sessions of this client are still waiting for their peer connection (the limit "
                f"is {self.max_pending}); connect them, stop them, or wait until they time out",
                retry_after_s=self.connect_timeout_s,
            )
