"""Client messages parse into documented types or fail with the documented error code."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest

from server import protocol as P
from server.portrait import decode_portrait


def parse(obj) -> P.ClientMessage:
    return P.parse_message(obj if isinstance(obj, str) else json.dumps(obj))


def code_of(fn, *args) -> str:
    with pytest.raises(P.ProtocolError) as info:
        fn(*args)
    return info.value.code


def test_each_documented_message_parses_with_its_defaults() -> None:
    offer = parse({"type": "offer", "sdp": "v=0", "future_field": 1})
    assert offer == P.Offer(sdp="v=0", mode="mic", prompt="", portrait=None, sample_rate=16_000)
    assert parse({"type": "ice", "candidate": None}) == P.Ice()
    assert parse({"type": "push", "audio": "AAA=", "sample_rate": 24_000}).sample_rate == 24_000
    assert parse({"type": "push_end", "session": "s1"}) == P.PushEnd(session="s1")
    assert parse({"type": "interrupt"}) == P.Interrupt()
    assert parse({"type": "switch", "prompt": "hi"}) == P.Switch(prompt="hi")
    assert parse({"type": "stop"}) == P.Stop() and parse({"type": "ping"}) == P.Ping()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", "bad_json"),
        ("{", "bad_json"),
        ('"offer"', "bad_json"),
        ({"sdp": "v=0"}, "unknown_type"),
        ({"type": 3}, "unknown_type"),
        ({"type": "OFFER", "sdp": "v=0"}, "unknown_type"),
        ({"type": "offer"}, "bad_message"),
        ({"type": "offer", "sdp": "v=0", "mode": "camera"}, "bad_message"),
        ({"type": "offer", "sdp": "v=0", "sample_rate": "16000"}, "bad_message"),
        ({"type": "offer", "sdp": "v=0", "sample_rate": True}, "bad_message"),
        ({"type": "push"}, "bad_message"),
        ({"type": "ice", "sdpMLineIndex": "0"}, "bad_message"),
    ],
)
def test_malformed_messages_get_the_documented_code(raw, code) -> None:
    assert code_of(parse, raw) == code


def test_every_error_code_is_documented_in_the_protocol_reference() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    for code in P.ERROR_CODES:
        assert f"`{code}`" in doc, code
    for kind in P.CLIENT_MESSAGES:
        assert f"`{kind}`" in doc, kind


def test_base64_is_strict_and_bounded() -> None:
    assert P.decode_base64(base64.b64encode(b"abc").decode(), "x", "bad_audio", 10, "message_too_large") == b"abc"
    assert P.decode_base64("data:image/png;base64,YWJj", "x", "bad_image", 10, "upload_too_large") == b"abc"
    assert code_of(P.decode_base64, "YW Jj!", "x", "bad_audio", 10, "message_too_large") == "bad_audio"
    big = base64.b64encode(bytes(100)).decode()
    assert code_of(P.decode_base64, big, "x", "bad_image", 50, "upload_too_large") == "upload_too_large"


def png(width: int, height: int) -> bytes:
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :, 2] = 200  # red in BGR
    return cv2.imencode(".png", img)[1].tobytes()


def test_a_good_portrait_decodes_to_rgb() -> None:
    image = decode_portrait(png(64, 48), 1 << 20, 1 << 20)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and image[0, 0, 0] == 200


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "bad_image"),
        (b"%PDF-1.4 not an image", "bad_image"),
        (b"\xff\xd8\xff\xe0" + bytes(100), "bad_image"),  # a JPEG signature on garbage
        (None, "upload_too_large"),  # more pixels than allowed
        (b"\x89PNG\r\n\x1a\n" + bytes(2 << 20), "upload_too_large"),  # more bytes than allowed
    ],
)
def test_bad_or_huge_portraits_are_refused_before_decoding(data, code) -> None:
    data = png(1200, 1000) if data is None else data
    assert code_of(decode_portrait, data, 1 << 20, 1000 * 1000) == code


def test_a_tiny_portrait_is_refused() -> None:
    assert code_of(decode_portrait, png(8, 8), 1 << 20, 1 << 20) == "bad_image"
