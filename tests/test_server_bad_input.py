"""Bad input gets a JSON error on its own connection while a healthy session keeps streaming."""

from __future__ import annotations

import asyncio
import base64
import struct
import urllib.request
import zlib

import cv2
import numpy as np
from server_peer import PeerClient, offer_sdp

LIMITS = {"max_message_bytes": 64 * 1024, "max_upload_bytes": 16 * 1024}


def png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose header claims width x height (a decompression bomb's calling card)."""
    ok, buf = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))
    data = bytearray(buf.tobytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_each_bad_input_gets_its_error_and_a_healthy_session_keeps_streaming(start_server) -> None:
    app = await start_server(**LIMITS)
    ws_url = app.url.replace("http", "ws") + "ws"
    healthy = await PeerClient(ws_url, keep_video=False).connect()
    await healthy.start(mode="push")
    await healthy.wait_frames(10)
    bad = await PeerClient(ws_url).connect()
    sdp = await offer_sdp()
    cases: list[tuple[str | bytes | dict, str]] = [
        ("{not json", "bad_json"),
        ("[1, 2, 3]", "bad_json"),
        ({"type": "dance"}, "unknown_type"),
        ({"type": "offer"}, "bad_message"),
        ({"type": "offer", "sdp": 42}, "bad_message"),
        ({"type": "offer", "sdp": "hello"}, "bad_sdp"),
        ({"type": "offer", "sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nthis is not sdp\r\n"}, "bad_sdp"),
        ({"type": "offer", "sdp": sdp.replace("a=ice-ufrag", "a=x-ufrag"), "mode": "push"}, "bad_sdp"),
        ({"type": "offer", "sdp": sdp, "mode": "mic"}, "bad_sdp"),  # mic mode, but it sends no audio
        ("x" * (LIMITS["max_message_bytes"] + 1), "message_too_large"),
        (b"\0" * (LIMITS["max_message_bytes"] + 2), "message_too_large"),
        ({"type": "offer", "sdp": sdp, "mode": "push", "portrait": b64(b"GIF89a not an image")}, "bad_image"),
        (
            {"type": "offer", "sdp": sdp, "mode": "push", "portrait": b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)},
            "bad_image",
        ),
        ({"type": "offer", "sdp": sdp, "mode": "push", "portrait": "%%%not base64%%%"}, "bad_image"),
        (
            {"type": "offer", "sdp": sdp, "mode": "push", "portrait": b64(b"\xff\xd8\xff" + bytes(20_000))},
            "upload_too_large",
        ),
        (
            {"type": "offer", "sdp": sdp, "mode": "push", "portrait": b64(png_claiming(30_000, 30_000))},
            "upload_too_large",
        ),
        (b"\1\0\2\0", "unknown_session"),
        ({"type": "push", "audio": b64(bytes(640)), "session": "no-such-session"}, "unknown_session"),
        ({"type": "push_end"}, "unknown_session"),
        ({"type": "interrupt", "session": "nope"}, "unknown_session"),
        ({"type": "ice", "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}, "unknown_session"),
        ({"type": "push", "audio": "***", "session": healthy.session, "token": healthy.token}, "bad_audio"),
        ({"type": "push", "audio": b64(bytes(3)), "session": healthy.session, "token": healthy.token}, "bad_audio"),
        (
            {
                "type": "push",
                "audio": b64(bytes(4)),
                "session": healthy.session,
                "token": healthy.token,
                "sample_rate": 12345,
            },
            "bad_audio",
        ),
    ]
    try:
        frames_before = len(healthy.got.video)
        for message, code in cases:
            seen = len(bad.messages)
            await bad.send(message)
            error = await bad.wait_for("error", after=seen, timeout=5)
            assert error["code"] == code, (str(message)[:80], error)
            assert error["message"]
        await bad.send({"type": "ping"})
        await bad.wait_for("pong", timeout=5)  # the connection survived all of it
        await asyncio.sleep(1.0)
        assert len(healthy.got.video) - frames_before >= 25  # kept streaming meanwhile
        assert "error" not in healthy.types() and "closed" not in healthy.types()
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(app.url + "metrics").read().decode())
        assert 'liveavatar_errors_total{code="bad_sdp"} 4' in metrics
        assert "liveavatar_sessions_active 1" in metrics
    finally:
        await bad.close()
        await healthy.close()


async def test_a_valid_portrait_upload_and_a_switch_are_accepted(start_server, assets) -> None:
    app = await start_server()
    ok, png = cv2.imencode(
        ".png", cv2.imread(str(assets.parent.parent / "liveavatar/assets/portrait_astronaut_512.png"))
    )
    client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
    try:
        await client.start(mode="push", portrait=b64(png.tobytes()), prompt="an astronaut talking")
        await client.wait_frames(5)
        await client.send({"type": "switch", "prompt": "another prompt", "portrait": b64(png.tobytes())})
        switched = await client.wait_for("switched", timeout=5)
    finally:
        await client.close()
    assert switched["block"] >= 1
    assert "error" not in client.types()
