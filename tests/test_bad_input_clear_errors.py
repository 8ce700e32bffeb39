"""Every bad input gets its own clear error before anything is allocated, and leaves the session alone:
deeply nested JSON, offers that could never connect, portraits that cannot be framed."""

from __future__ import annotations

import base64
import re

import cv2
import numpy as np
import pytest
from server_peer import PeerClient, offer_sdp

from server.protocol import ProtocolError, parse_message


def ws_url(app) -> str:
    return app.url.replace("http", "ws") + "ws"


def only_fingerprint(sdp: str, line: str) -> str:
    """Every fingerprint of the offer replaced by `line` (or removed when empty)."""
    sdp = re.sub(r"a=fingerprint:[^\r\n]*\r\n", "", sdp)
    return sdp.replace("a=setup:", f"{line}\r\na=setup:") if line else sdp


MD5 = "a=fingerprint:md5 " + ":".join(["AB"] * 16)


def mutations(sdp: str) -> list[tuple[str, str, str]]:
    """(name, mutated offer, words the error message must hold)."""
    return [
        ("md5 fingerprint only", only_fingerprint(sdp, MD5), "sha-256"),
        ("no fingerprint", only_fingerprint(sdp, ""), "fingerprint"),
        ("short sha-256", only_fingerprint(sdp, "a=fingerprint:sha-256 AB:CD"), "32 hex bytes"),
        ("RTP/AVP profile", sdp.replace("UDP/TLS/RTP/SAVPF", "RTP/AVP"), "UDP/TLS/RTP/SAVPF"),
        ("port 0", re.sub(r"m=audio \d+ ", "m=audio 0 ", sdp), "port 0"),
        ("100 KB ice-ufrag", re.sub(r"a=ice-ufrag:\S+", "a=ice-ufrag:" + "u" * 100_000, sdp), "ice-ufrag"),
        ("short ice-pwd", re.sub(r"a=ice-pwd:\S+", "a=ice-pwd:short", sdp), "ice-pwd"),
        ("no ice-ufrag", re.sub(r"a=ice-ufrag:\S+\r\n", "", sdp), "ice-ufrag"),
        ("no fingerprint nor setup line", re.sub(r"a=(fingerprint|setup):[^\r\n]*\r\n", "", sdp), "fingerprint"),
        (
            "no ICE line at all",
            re.sub(r"a=(ice-ufrag|ice-pwd|ice-options|candidate|end-of-candidates)[^\r\n]*\r\n", "", sdp),
            "ice-ufrag",
        ),
        ("BUNDLE names a missing mid", sdp.replace("a=mid:0\r\n", ""), "BUNDLE"),
        ("no common video codec", re.sub(r"a=rtpmap:(\d+) (VP8|H264|rtx)/", r"a=rtpmap:\1 XYZ/", sdp), "codec"),
    ]


def test_deeply_nested_json_is_bad_json() -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_message("[" * 100_000 + "]" * 100_000)
    assert refused.value.code == "bad_json" and "nested" in refused.value.message


async def test_deeply_nested_json_gets_bad_json_and_the_session_goes_on(start_server) -> None:
    app = await start_server()
    client = await PeerClient(ws_url(app), keep_video=False).connect()
    try:
        await client.start(mode="push")
        for depth in (1000, 100_000):
            seen = len(client.messages)
            await client.send("[" * depth + "]" * depth)
            error = await client.wait_for("error", after=seen, timeout=5)
            assert error["code"] == "bad_json", error
        await client.send({"type": "ping"})
        await client.wait_for("pong", timeout=5)
    finally:
        await client.close()
    assert "closed" not in client.types()


async def test_offers_that_could_never_connect_get_bad_sdp_naming_the_problem(start_server) -> None:
    app = await start_server(max_sessions=1)
    client = await PeerClient(ws_url(app)).connect()
    sdp = await offer_sdp()
    try:
        for name, bad, words in mutations(sdp):
            seen = len(client.messages)
            await client.send({"type": "offer", "sdp": bad, "mode": "push"})
            error = await client.wait_for("error", after=seen, timeout=5)
            assert error["code"] == "bad_sdp" and words in error["message"], (name, error)
            assert len(app.registry) == 0, name  # refused before a session was admitted
        assert app.metrics.sessions_total == 0
        await client.start(mode="push")  # the one place is still free for a good offer
    finally:
        await client.close()
    assert [m for m in client.messages if m["type"] in ("closed", "answer")][-1]["type"] == "answer"


async def test_a_video_only_push_offer_is_refused_with_the_fix(start_server) -> None:
    app = await start_server()
    client = await PeerClient(ws_url(app)).connect()
    try:
        await client.send({"type": "offer", "sdp": await offer_sdp(audio=False), "mode": "push"})
        error = await client.wait_for("error", timeout=5)
    finally:
        await client.close()
    assert error["code"] == "bad_sdp"
    assert "audio" in error["message"] and "recvonly" in error["message"] and "None" not in error["message"]
    assert len(app.registry) == 0


@pytest.mark.parametrize("shape", [(32, 400_000), (400_000, 32), (40, 2000)])
async def test_a_portrait_that_decodes_but_cannot_be_framed_gets_bad_image(start_server, shape) -> None:
    app = await start_server(max_image_pixels=16_000_000)
    ok, png = cv2.imencode(".png", np.full((*shape, 3), 128, np.uint8))
    client = await PeerClient(ws_url(app)).connect()
    try:
        portrait = base64.b64encode(png.tobytes()).decode()
        await client.send({"type": "offer", "sdp": await offer_sdp(), "mode": "push", "portrait": portrait})
        error = await client.wait_for("error", timeout=10)
    finally:
        await client.close()
    assert error["code"] == "bad_image" and "cannot be framed" in error["message"], error
    assert "OpenCV" not in error["message"] and "closed" not in client.types()
    assert len(app.registry) == 0


async def test_a_bundle_only_m_line_with_port_0_is_not_a_rejected_one() -> None:
    """RFC 8843: with max-bundle, GStreamer's webrtcbin offers every m-line after the first with port 0 and
    `a=bundle-only`; it shares the first one's transport. Port 0 without that (or with no real port left
    in the BUNDLE group) still means a rejected m-line."""
    from server.rtc import check_offer

    sdp = await offer_sdp()
    assert "a=group:BUNDLE" in sdp
    bundle_only = re.sub(r"m=video \d+ ", "m=video 0 ", sdp).replace("a=mid:1\r\n", "a=mid:1\r\na=bundle-only\r\n")
    assert "a=bundle-only" in bundle_only
    check_offer(bundle_only, "push")
    for name, bad in (
        ("no bundle-only", re.sub(r"m=video \d+ ", "m=video 0 ", sdp)),
        ("whole group on port 0", re.sub(r"m=audio \d+ ", "m=audio 0 ", bundle_only)),
        ("not in the group", re.sub(r"a=group:BUNDLE[^\r\n]*\r\n", "", bundle_only)),
    ):
        with pytest.raises(ProtocolError) as refused:
            check_offer(bad, "push")
        assert refused.value.code == "bad_sdp" and "port 0" in refused.value.message, name
