"""Short-lived TURN credentials (the TURN REST API scheme used by coturn's `use-auth-secret`).

The browser never sees the static shared secret: it gets `username = "<expiry>:<user>"` and
`credential = base64(HMAC-SHA1(secret, username))`, valid until `expiry` (unix seconds).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class TurnCredential:
    username: str
    credential: str
    expires_at: int


def rest_credential(secret: str, user: str = "liveavatar", ttl_s: int = 3600, now: float | None = None) -> TurnCredential:
    """A credential coturn accepts until `now + ttl_s` when it runs with the same static secret."""
    if not secret:
        raise ValueError("TURN shared secret is empty")
    if ttl_s <= 0:
        raise ValueError("TURN credential ttl must be positive")
    expires = int((time.time() if now is None else now) + ttl_s)
    username = f"{expires}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode(), expires)
