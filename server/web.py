"""Plain HTTP on the signalling port: the client page, token checks and response helpers.

Answered from the WebSocket server's `process_request` hook, so there is one listener and no web framework.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
import urllib.parse
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

CLIENT_DIR = Path(__file__).resolve().parent.parent / "client"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".wav": "audio/wav",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}


def authorized(tokens: list[str], request: Request, query: str) -> bool:
    """With `auth_tokens` set, `/ws` and `/metrics` need one of them; compared in constant time."""
    if not tokens:
        return True
    given = urllib.parse.parse_qs(query).get("token", [""])[0]
    headers = request.headers.get_all("Authorization")
    if len(headers) > 1:  # ambiguous: refuse rather than pick one
        return False
    header = headers[0] if headers else ""
    if header.lower().startswith("bearer "):
        given = header[7:].strip()
    return any(hmac.compare_digest(given.encode(), t.encode()) for t in tokens)


def origin_allowed(allowed: list[str], headers: Headers) -> bool:
    """A browser page may open `/ws` only from the server's own origin (the `Origin` names the `Host`
    it asked for) or one of `allowed` (`*`: any), so another web site the user visits cannot drive
    the server. Clients without an `Origin` header are not browsers, and are left to `auth_tokens`."""
    origins = headers.get_all("Origin")
    if not origins:
        return True
    hosts = headers.get_all("Host")
    if len(origins) > 1 or len(hosts) > 1:  # ambiguous: refuse rather than pick one
        return False
    origin = origins[0].strip().lower().rstrip("/")
    if "*" in allowed or origin in (a.lower().rstrip("/") for a in allowed):
        return True
    return bool(hosts) and urllib.parse.urlsplit(origin).netloc == hosts[0].strip().lower()


def head_bytes(request: Request) -> int:
    """Size of the request line and headers as received (near enough: the separators are counted)."""
    return len(request.path) + 16 + sum(len(k) + len(v) + 4 for k, v in request.headers.raw_items())


class LogLimit:
    """At most one warning per kind of event every `interval_s`, the next one counting those left out:
    a flood of refused requests must not become a flood of log lines."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.log, self.interval_s = logger, interval_s
        self._seen: dict[str, tuple[float, int]] = {}

    def warning(self, event: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, skipped = self._seen.get(event, (-math.inf, 0))
        if now - last < self.interval_s:
            self._seen[event] = (last, skipped + 1)
            return
        self._seen[event] = (now, 0)
        more = f" (and {skipped} more in the last {self.interval_s:.0f} s)" if skipped else ""
        self.log.warning(f"event={event} {message}{more}", *args)


def static_file(client_dir: Path, path: str) -> Path | None:
    """A file inside the client folder, never outside it (no `..`, no hidden files)."""
    name = "index.html" if path in ("", "/") else urllib.parse.unquote(path).lstrip("/")
    if "\0" in name or any(part.startswith(".") for part in name.split("/")):
        return None
    try:
        file = (client_dir / name).resolve()
        if not file.is_relative_to(client_dir) or not file.is_file():
            return None
    except (OSError, ValueError):  # a name the file system cannot even look up
        return None
    return file


def response(body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            ("Connection", "close"),
        ]
    )
    return Response(200, "OK", headers, body)
