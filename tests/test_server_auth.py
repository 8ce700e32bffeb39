"""Token auth: with `auth_tokens` set, /ws and /metrics need a token; /healthz and the page do not."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
import websockets

from server.config import ConfigError, ServerConfig, load_config

TOKEN = "s3cret-token-0123456789"


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


async def test_ws_and_metrics_need_the_token_but_health_and_page_do_not(start_server) -> None:
    app = await start_server(auth_tokens=[TOKEN])
    base = app.url.split("//", 1)[1].rstrip("/")
    assert await asyncio.to_thread(_get, f"http://{base}/healthz") == 200
    assert await asyncio.to_thread(_get, f"http://{base}/") == 200
    assert await asyncio.to_thread(_get, f"http://{base}/metrics") == 401
    assert await asyncio.to_thread(_get, f"http://{base}/metrics?token=wrong-token-0123456789") == 401
    assert await asyncio.to_thread(_get, f"http://{base}/metrics", {"Authorization": f"Bearer {TOKEN}"}) == 200
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with websockets.connect(f"ws://{base}/ws"):
            pass
    assert refused.value.response.status_code == 401
    async with websockets.connect(f"ws://{base}/ws?token={TOKEN}") as ws:
        first = await asyncio.wait_for(ws.recv(), 5)
        assert '"config"' in first


def test_tokens_are_masked_and_short_ones_refused() -> None:
    cfg = load_config(env={"LIVEAVATAR_AUTH_TOKENS": f"{TOKEN},another-token-0123456"})
    assert cfg.auth_tokens == [TOKEN, "another-token-0123456"]
    assert cfg.masked()["auth_tokens"] == ["***", "***"]
    with pytest.raises(ConfigError, match="at least 16"):
        ServerConfig(auth_tokens=["short"]).validate()
