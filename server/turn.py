"""TURN for browsers behind NAT: short-lived credentials, the ICE server list, and a credential probe.

Credentials follow the TURN REST API scheme used by coturn's `use-auth-secret`. The browser never sees
the static shared secret: it gets `username = "<expiry>:<user>"` and
`credential = base64(HMAC-SHA1(secret, username))`, valid until `expiry` (unix seconds).

The probe exists because a wrong secret fails silently in WebRTC: ICE gathers no relay candidate and the
call times out with no reason given. Probing the TURN server with a freshly minted credential at start-up
(and per session, if wanted) turns that into one clear sentence for the log and the page.

aiortc/aioice are imported inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STUN_SCHEMES = ("stun:", "stuns:")
TURN_SCHEMES = ("turn:", "turns:")

# STUN/TURN error codes a misconfigured deployment actually hits (RFC 8489 / RFC 8656).
_ERROR_HINTS = {
    401: "the server's turn_secret must equal coturn's static-auth-secret, and both clocks must agree "
    "within the credential ttl",
    403: "coturn refused the request (check denied-peer-ip / allowed-peer-ip and the realm)",
    437: "allocation mismatch: another allocation from the same address and port is still alive",
    441: "wrong credentials for this allocation",
    486: "allocation quota reached (coturn's user-quota / total-quota)",
    508: "the TURN server has no relay port left (coturn's min-port..max-port range is exhausted)",
}


@dataclass(frozen=True)
class TurnCredential:
    username: str
    credential: str
    expires_at: int


def rest_credential(
    secret: str, user: str = "liveavatar", ttl_s: int = 3600, now: float | None = None
) -> TurnCredential:
    """A credential coturn accepts until `now + ttl_s` when it runs with the same static secret."""
    if not secret:
        raise ValueError("TURN shared secret is empty")
    if ttl_s <= 0:
        raise ValueError("TURN credential ttl must be positive")
    expires = int((time.time() if now is None else now) + ttl_s)
    username = f"{expires}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode(), expires)


def ice_servers(
    stun_urls: Sequence[str] = (),
    turn_urls: Sequence[str] = (),
    turn_secret: str = "",
    ttl_s: int = 3600,
    user: str = "liveavatar",
    now: float | None = None,
) -> list[dict[str, Any]]:
    """The `RTCConfiguration.iceServers` list handed to one browser (JSON-ready dicts).

    Each call mints a fresh credential, so every session gets its own expiry. TURN URLs without a secret
    are refused rather than sent without credentials, which browsers would reject anyway.
    """
    for url in stun_urls:
        if not url.startswith(STUN_SCHEMES):
            raise ValueError(f"not a STUN URL (expected stun: or stuns:): {url!r}")
    for url in turn_urls:
        if not url.startswith(TURN_SCHEMES):
            raise ValueError(f"not a TURN URL (expected turn: or turns:): {url!r}")
    if turn_urls and not turn_secret:
        raise ValueError("turn_urls are set but turn_secret is empty: set the secret coturn uses")
    if turn_secret and not turn_urls:
        raise ValueError("turn_secret is set but there are no turn_urls")

    servers: list[dict[str, Any]] = []
    if stun_urls:
        servers.append({"urls": list(stun_urls)})
    if turn_urls:
        cred = rest_credential(turn_secret, user=user, ttl_s=ttl_s, now=now)
        servers.append({"urls": list(turn_urls), "username": cred.username, "credential": cred.credential})
    return servers


def rtc_configuration(servers: Sequence[dict[str, Any]], relay_only: bool = False) -> Any:
    """The aiortc `RTCConfiguration` for the same list, for the server's own peer connection.

    aiortc uses only the first STUN and the first TURN URL it can handle (UDP or TCP, not TLS-over-UDP).
    """
    from aiortc import RTCConfiguration, RTCIceServer
    from aiortc.rtcconfiguration import RTCIceTransportPolicy

    ice = [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential")) for s in servers]
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=ice, iceTransportPolicy=policy)


@dataclass(frozen=True)
class TurnProbeResult:
    url: str
    ok: bool
    relayed_address: tuple[str, int] | None = None
    error: str = ""


class _Sink(asyncio.DatagramProtocol):
    """Receives nothing useful; tells the probe when aioice has deleted the allocation."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def probe_turn(url: str, username: str, credential: str, timeout_s: float = 5.0) -> TurnProbeResult:
    """Allocate (then free) one relay on the TURN server at `url` with these credentials.

    Never raises for network or credential problems: the result's `error` says what went wrong in words
    an operator can act on.
    """
    from aioice import stun
    from aioice.turn import create_turn_endpoint
    from aiortc.rtcicetransport import parse_stun_turn_uri

    try:
        parsed = parse_stun_turn_uri(url)
    except ValueError as exc:
        return TurnProbeResult(url, False, error=f"TURN URL {url!r} is malformed ({exc})")
    if parsed["scheme"] not in ("turn", "turns"):
        return TurnProbeResult(url, False, error=f"{url!r} is not a TURN URL")
    where = f"TURN server {parsed['host']}:{parsed['port']} ({parsed['transport']})"

    try:
        transport, sink = await asyncio.wait_for(
            create_turn_endpoint(
                _Sink,
                server_addr=(parsed["host"], parsed["port"]),
                username=username,
                password=credential,
                ssl=parsed["scheme"] == "turns",
                transport=parsed["transport"],
            ),
            timeout_s,
        )
    except stun.TransactionFailed as exc:
        code, reason = exc.response.attributes.get("ERROR-CODE", (0, "no error code"))
        hint = _ERROR_HINTS.get(code, "see the TURN server's log")
        return TurnProbeResult(url, False, error=f"{where} refused the allocation ({code} {reason}): {hint}")
    except (TimeoutError, stun.TransactionTimeout):
        return TurnProbeResult(
            url, False, error=f"{where} did not answer within {timeout_s:g} s: is it running, and is the port open?"
        )
    except OSError as exc:
        return TurnProbeResult(url, False, error=f"{where} is unreachable: {exc}")
    except ConnectionError as exc:
        return TurnProbeResult(url, False, error=f"{where} sent an unusable allocation response: {exc}")

    relayed = transport.get_extra_info("sockname")
    transport.close()
    # Waiting for the deletion keeps probes from leaking allocations (and sockets) on the TURN server.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(sink.closed), timeout_s)
    return TurnProbeResult(url, True, relayed_address=tuple(relayed) if relayed else None)


async def check_turn(
    turn_urls: Sequence[str], turn_secret: str, timeout_s: float = 5.0, user: str = "liveavatar-probe"
) -> list[TurnProbeResult]:
    """Probe every TURN URL with a credential minted from `turn_secret`, exactly as a browser would get it."""
    cred = rest_credential(turn_secret, user=user, ttl_s=300)
    return list(
        await asyncio.gather(*(probe_turn(url, cred.username, cred.credential, timeout_s) for url in turn_urls))
    )


def turn_error_summary(results: Sequence[TurnProbeResult]) -> str:
    """One message for the log and the client, empty when every TURN URL works."""
    errors = [r.error for r in results if not r.ok]
    return "; ".join(errors)
