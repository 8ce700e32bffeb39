"""Plain HTTP on the signalling port: the client page, token checks and response helpers.

Answered from the WebSocket server's `process_request` hook, so there is one listener and no web framework.
"""

from __future__ import annotations

import hmac
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
