"""The one port: page files, /healthz, /metrics, the /ws greeting, and `liveavatar serve` itself."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request

import pytest
import websockets


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


async def get(url: str) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(fetch, url)


async def test_serves_the_page_files_with_their_types_and_nothing_outside_the_folder(start_server) -> None:
    app = await start_server()
    status, kind, body = await get(app.url)
    assert status == 200 and kind.startswith("text/html") and b'<video id="video"' in body
    for name, expected in (("app.js", "text/javascript"), ("style.css", "text/css"), ("sample.wav", "audio/wav")):
        status, kind, body = await get(app.url + name)
        assert status == 200 and kind.startswith(expected) and body
    for path in ("missing.html", "..%2Fpyproject.toml", "%2e%2e/server/app.py", ".hidden"):
        status, _, _ = await get(app.url + path)
        assert status == 404, path


async def test_healthz_and_prometheus_metrics(start_server) -> None:
    app = await start_server()
    assert (await get(app.url + "healthz"))[0] == 200
    status, kind, body = await get(app.url + "metrics")
    text = body.decode()
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    for name in (
        "sessions_active",
        "sessions_total",
        "sessions_rejected_total",
        "frames_sent_total",
        "output_fps",
        "output_lag_seconds",
        "queue_depth",
        "errors_total",
    ):
        assert f"# TYPE liveavatar_{name} " in text
    assert 'liveavatar_info{backend="preview"} 1' in text
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


async def test_websocket_greets_with_the_config_a_client_needs(start_server) -> None:
    app = await start_server(
        ice_servers=["stun:stun.example.org:3478"],
        turn_url="turn:127.0.0.1:9",
        turn_secret="s3cret",
        ice_transport_policy="relay",
    )
    async with websockets.connect(app.url.replace("http", "ws") + "ws") as ws:
        config = json.loads(await ws.recv())
    assert config["type"] == "config" and config["backend"] == "preview"
    assert config["fps"] == 25 and config["framesPerBlock"] == 12 and config["size"] == "512*512"
    assert config["iceTransportPolicy"] == "relay"
    stun, turn = config["iceServers"]
    assert stun == {"urls": "stun:stun.example.org:3478"}
    assert turn["urls"] == ["turn:127.0.0.1:9"] and turn["username"] and turn["credential"]
    assert "s3cret" not in json.dumps(config)


@pytest.mark.timeout(120)
def test_serve_command_prints_the_url_serves_and_stops_cleanly(server_process) -> None:
    server = server_process("--max-sessions", "2", "--log-level", "info")
    status, _, body = fetch(server.url)
    assert status == 200 and b"liveavatar" in body
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0
    output = server.output()
    assert f"open {server.url}" in output
    assert "start-up heap frozen" in output  # no long GC pauses over the model and libraries while serving
