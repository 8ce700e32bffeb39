"""Generated hostile signalling inputs for the fuzz test (tests/test_signalling_fuzz.py).

Every generator takes a seeded `random.Random`, so a failing input can be replayed from the seed.
An input names the connection it needs: `bare` (no session), `push` or `mic` (one that holds a
session of that mode, never connected: the server must cope with inputs to a session still waiting
for ICE, the cheapest state to reach and the one a hostile client controls best).
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

Payload = str | bytes | dict[str, Any]


@dataclass
class Input:
    category: str
    on: str
    """`bare`, `push` or `mic`: the connection (and session mode) it is sent on."""
    payload: Payload


JUNK_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    -(2**63),
    1e308,
    -1e-308,
    0.5,
    "",
    " ",
    "x",
    "\x00",
    "\ud7ff",
    "é" * 300,
    "A" * 70_000,
    [],
    [1, "2"],
    {},
    {"a": {"b": []}},
    "null",
    "NaN",
    "-1",
    "16000",
    "true",
]
MESSAGE_TYPES = ["offer", "ice", "push", "push_end", "interrupt", "switch", "stop", "ping"]
FIELDS = [
    "sdp",
    "mode",
    "prompt",
    "portrait",
    "sample_rate",
    "candidate",
    "sdpMid",
    "sdpMLineIndex",
    "audio",
    "session",
    "token",
    "type",
]


def junk(rng: random.Random) -> Any:
    return rng.choice(JUNK_VALUES)


# ---- JSON structure ---------------------------------------------------------------------------------


def json_inputs(rng: random.Random, count: int) -> list[Input]:
    makers = [
        lambda: "",
        lambda: rng.randbytes(rng.randint(1, 200)).decode("latin-1"),
        lambda: "[" * rng.randint(1, 5000) + "]" * rng.randint(0, 5000),
        lambda: '{"a":' * rng.randint(1, 3000) + "1" + "}" * rng.randint(0, 3000),
        lambda: json.dumps(junk(rng)),
        lambda: json.dumps({"type": "ping"})[: rng.randint(0, 14)],
        lambda: '{"type": "ping", "type": "offer"}',
        lambda: '{"type": NaN}',
        lambda: '{"type": Infinity}',
        lambda: '{"type": -Infinity}',
        lambda: '{"type": "ping"' + " " * rng.randint(0, 1000) + "}",
        lambda: "\ufeff" + json.dumps({"type": "ping"}),
        lambda: '{"type": "\\ud800"}',
        lambda: '{"\\u0000": 1}',
        lambda: "1" * rng.randint(1, 5000),
        lambda: "-" + "9" * 4400,
        lambda: "1e" + "9" * 400,
        lambda: json.dumps([{"type": "ping"}] * rng.randint(1, 50)),
        lambda: json.dumps({"type": "ping", "x": "y" * rng.randint(0, 100_000)}),
        lambda: "\n".join([json.dumps({"type": "ping"})] * 3),
        lambda: rng.randbytes(rng.randint(0, 64)),  # a binary frame on a connection without a session
    ]
    return [Input("json", "bare", rng.choice(makers)()) for _ in range(count)]


# ---- message fields and types -----------------------------------------------------------------------


def field_inputs(rng: random.Random, count: int) -> list[Input]:
    out = []
    for _ in range(count):
        kind = rng.choice(MESSAGE_TYPES + [junk(rng), "OFFER", "Ping", "answer", "config"])
        msg: dict[str, Any] = {"type": kind}
        for name in rng.sample(FIELDS[:-1], rng.randint(0, 4)):
            msg[name] = junk(rng)
        if rng.random() < 0.2:
            del msg["type"]
        # stop, switch and friends go to a live session too: the session must survive them (or end cleanly)
        out.append(Input("fields", rng.choice(["bare", "bare", "push", "mic"]), msg))
    return out


# ---- SDP mutations of a real aiortc offer -----------------------------------------------------------


def _mutate_line(rng: random.Random, line: str) -> str:
    tokens = re.split(r"([ :=/])", line)
    idx = rng.randrange(len(tokens))
    tokens[idx] = str(
        rng.choice(
            [
                "",
                "0",
                "-1",
                "65536",
                "4294967296",
                "x" * rng.randint(1, 3000),
                "ÿ",
                "\t",
                "NaN",
                "9" * 40,
                "*",
                "IN",
                "IP6",
                "::1",
                "SAVPF",
                "sha-1",
                "md5",
            ]
        )
    )
    return "".join(tokens)


EXTRA_LINES = [
    "a=rtpmap:96 VP8/0",
    "a=rtpmap:111 opus/0/2",
    "a=rtpmap:111 opus/48000/0",
    "a=rtpmap:200 VP8/90000",
    "a=rtpmap:96 VP8",
    "a=fmtp:96 x",
    "a=fmtp:111 minptime=-5;useinbandfec=2",
    "a=rtcp-fb:96 nack xyz",
    "a=rtcp-fb:* ccm fir",
    "a=extmap:0 urn:x",
    "a=extmap:4095 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=extmap:99999 x",
    "a=ssrc:0 cname:x",
    "a=ssrc:4294967296 cname:y",
    "a=ssrc-group:FID 1",
    "a=ssrc-group:FID x y",
    "a=msid:",
    "a=mid:",
    "a=group:BUNDLE 7 8 9",
    "a=rtcp:0",
    "a=rtcp:x IN IP4 1.2.3.4",
    "a=setup:holdconn",
    "a=setup:",
    "a=sctpmap:5000 webrtc-datachannel 1024",
    "a=max-message-size:-1",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "m=video 9 UDP/TLS/RTP/SAVPF 96",
    "m=audio 9 UDP/TLS/RTP/SAVPF",
    "m=text 9 RTP/AVP 0",
    "c=IN IP4 300.1.1.1",
    "c=IN IP6 zz",
    "a=candidate:1 1 udp 1 1.2.3.4 0 typ host",
    "a=candidate:x 1 UDP 1 host.local 1 typ srflx",
    "a=candidate:" + "9" * 100,
    "a=ice-options:trickle renomination",
    "a=end-of-candidates",
    "a=bundle-only",
    "a=fingerprint:sha-256 " + ":".join(["00"] * 32),
    "a=fingerprint:sha-512 zz",
    "a=fingerprint:",
    "a=rid:1 send",
    "a=simulcast:send 1;2",
    "b=AS:-1",
    "a=framerate:0",
    "a=ptime:0",
    "a=maxptime:99999999",
]


def mutate_sdp(rng: random.Random, sdp: str) -> str:
    lines = sdp.rstrip("\r\n").split("\r\n")
    for _ in range(rng.randint(1, 3)):
        lines = lines or ["v=0"]
        op = rng.randrange(9)
        i = rng.randrange(len(lines))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            lines[i] = _mutate_line(rng, lines[i])
        elif op == 4:
            lines.insert(i, rng.choice(EXTRA_LINES))
        elif op == 5:
            prefix = rng.choice(
                [
                    "a=rtpmap",
                    "a=fingerprint",
                    "a=ice-",
                    "a=candidate",
                    "m=",
                    "a=mid",
                    "a=setup",
                    "a=group",
                    "c=",
                    "a=ssrc",
                    "a=rtcp",
                    "a=extmap",
                ]
            )
            lines = [line for line in lines if not line.startswith(prefix)] or ["v=0"]
        elif op == 6:
            chars = list(lines[i])
            for _ in range(rng.randint(1, 4)):
                if chars:
                    chars[rng.randrange(len(chars))] = chr(
                        rng.choice([0, 9, 32, 61, 58, 255, 0x2028, rng.randint(33, 126)])
                    )
            lines[i] = "".join(chars)
        elif op == 7:
            lines = lines[: rng.randint(1, len(lines))]
        else:
            lines[i] = re.sub(
                r"\d+", lambda m: str(rng.choice([0, 1, 65535, 65536, 2**32, int(m.group()) + 1])), lines[i]
            )
    sep = rng.choice(["\r\n"] * 6 + ["\n", "\r"])
    return sep.join(lines) + sep


def sdp_inputs(rng: random.Random, count: int, offers: dict[str, str]) -> list[Input]:
    out = []
    for _ in range(count):
        mode = rng.choice(["mic", "push"])
        sdp = mutate_sdp(rng, offers[rng.choice(["mic", "push"])])
        out.append(Input("sdp", "bare", {"type": "offer", "sdp": sdp, "mode": mode}))
    return out


# ---- ICE candidates ---------------------------------------------------------------------------------


def _candidate(rng: random.Random) -> Any:
    proto = rng.choice(["udp", "UDP", "tcp", "sctp", "x"])
    addr = rng.choice(
        [
            "127.0.0.1",
            "10.0.0.1",
            "::1",
            "fe80::1%eth0",
            "0.0.0.0",
            "255.255.255.255",
            "1.2.3.4.5",
            f"{rng.getrandbits(64):x}.local",
            "a" * 300 + ".local",
            "x.local",
            ".local",
            "localhost",
            "",
            "[::1]",
            "2001:db8::1",
        ]
    )
    port = rng.choice([0, 1, 9, 50000, 65535, 65536, -1, "p"])
    prio = rng.choice([0, 1, 2122260223, 2**32, 2**64, -5, "q"])
    typ = rng.choice(["host", "srflx", "relay", "prflx", "bogus", ""])
    tail = rng.choice(
        [
            "",
            " raddr 0.0.0.0 rport 0",
            " tcptype active",
            " generation 0 ufrag x network-cost 999",
            " raddr",
            " " + "k v " * 200,
        ]
    )
    line = f"candidate:{rng.randint(0, 99)} {rng.choice([1, 2, 0, 256])} {proto} {prio} {addr} {port} typ {typ}{tail}"
    if rng.random() < 0.15:
        line = line[: rng.randint(0, len(line))]
    if rng.random() < 0.1:
        line = line.removeprefix("candidate:")
    return rng.choice([line] * 8 + [None, "", junk(rng)])


def ice_inputs(rng: random.Random, count: int) -> list[Input]:
    out = []
    for _ in range(count):
        msg = {"type": "ice", "candidate": _candidate(rng)}
        if rng.random() < 0.8:
            msg["sdpMid"] = rng.choice(["0", "1", "7", "", None, 0, "x" * 500])
        if rng.random() < 0.8:
            msg["sdpMLineIndex"] = rng.choice([0, 1, 5, -1, 2**40, None, "0"])
        out.append(Input("ice", rng.choice(["push", "push", "mic", "bare"]), msg))
    return out


# ---- push audio -------------------------------------------------------------------------------------


def audio_inputs(rng: random.Random, count: int) -> list[Input]:
    rates = [8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 0, -16000, 1, 7999, 96000, 2**40, 16000.0]
    out = []
    for _ in range(count):
        nbytes = rng.choice([0, 1, 2, 3, 5, 639, 640, 641, 1999, 32_000, rng.randint(0, 8000)])
        data = (
            rng.randbytes(nbytes)
            if rng.random() < 0.5
            else ((np.sin(np.arange(nbytes // 2) / 7) * 8000).astype("<i2").tobytes() + b"\x01" * (nbytes % 2))
        )
        kind = rng.randrange(6)
        if kind == 0:
            payload: Payload = data  # binary PCM at the offer's rate
        elif kind <= 2:
            text = base64.b64encode(data).decode()
            text = rng.choice(
                [
                    text,
                    text,
                    text[:-1],
                    text + "=",
                    "data:audio/pcm;base64," + text,
                    text[:3],
                    text.replace("A", "-"),
                    " " + text,
                    "*" * len(text),
                ]
            )
            payload = {"type": "push", "audio": text, "sample_rate": rng.choice(rates)}
            if rng.random() < 0.2:
                del payload["sample_rate"]
        elif kind == 3:
            payload = {"type": rng.choice(["push_end", "interrupt"])}
        elif kind == 4:
            payload = {
                "type": "push",
                "audio": base64.b64encode(data).decode(),
                "session": rng.choice(["x", ""]),
                "token": rng.choice(["t", None]),
            }
        else:
            payload = {"type": "push", "audio": junk(rng)}
        out.append(Input("audio", rng.choice(["push"] * 5 + ["mic", "bare"]), payload))
    return out


# ---- portraits --------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, good_crc: bool = True) -> bytes:
    """A PNG signature and IHDR that claim `width` x `height`, and a tiny (wrong) IDAT."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if not good_crc:
        ihdr = ihdr[:-4] + b"\0\0\0\0"
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b"")


def jpeg_header(width: int, height: int) -> bytes:
    """A JPEG SOI and baseline SOF0 that claim `width` x `height`, then end."""
    sof = struct.pack(">BBHBHHB", 0xFF, 0xC0, 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def encoded(rng: random.Random, fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    image = Image.fromarray(np.uint8(rng.getrandbits(8)) + np.zeros((size[1], size[0], 3), np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _portrait_bytes(rng: random.Random) -> bytes:
    dims = rng.choice(
        [
            (100_000, 100_000),
            (32, 400_000),
            (400_000, 32),
            (0, 0),
            (1, 1),
            (2**31 - 1, 1),
            (65_535, 65_535),
            (5000, 5000),
            (64, 64),
            (31, 64),
            (64, 513),
        ]
    )
    kind = rng.randrange(9)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 3000))
    if kind == 1:
        return png_header(*dims, good_crc=rng.random() < 0.8)
    if kind == 2:
        return jpeg_header(*(min(d, 65_535) for d in dims))
    if kind == 3:
        full = encoded(rng, rng.choice(["PNG", "JPEG", "WEBP"]), (64, 64))
        return full[: rng.randint(0, len(full) - 1)]
    if kind == 4:
        return b"RIFF\0\0\0\0WEBPVP8 " + rng.randbytes(rng.randint(0, 200))
    if kind == 5:
        return rng.choice([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]) + rng.randbytes(rng.randint(0, 500))
    if kind == 6:
        if rng.random() < 0.5:
            return encoded(rng, "JPEG", rng.choice([(8, 8), (48, 40), (40, 330)]), rng.choice(["RGB", "L", "CMYK"]))
        return encoded(
            rng, "PNG", rng.choice([(8, 8), (48, 40), (40, 330)]), rng.choice(["RGB", "L", "P", "RGBA", "1"])
        )
    if kind == 7:
        return b"GIF89a" + rng.randbytes(40)
    full = bytearray(encoded(rng, "PNG", (64, 64)))
    for _ in range(rng.randint(1, 8)):
        full[rng.randrange(8, len(full))] = rng.getrandbits(8)
    return bytes(full)


def upload_inputs(rng: random.Random, count: int, offers: dict[str, str]) -> list[Input]:
    out = []
    for _ in range(count):
        text = base64.b64encode(_portrait_bytes(rng)).decode()
        if rng.random() < 0.1:
            text = rng.choice(["data:image/png;base64," + text, text[:-2], "%%%" + text, ""])
        if rng.random() < 0.3:  # the portrait of a new session, with a valid offer
            out.append(
                Input("upload", "bare", {"type": "offer", "sdp": offers["push"], "mode": "push", "portrait": text})
            )
        else:
            out.append(
                Input("upload", "push", {"type": "switch", "portrait": text, "prompt": rng.choice(["", "x" * 5000])})
            )
    return out


def all_inputs(seed: int, offers: dict[str, str], scale: int = 1) -> list[Input]:
    rng = random.Random(seed)
    inputs = (
        json_inputs(rng, 200 * scale)
        + field_inputs(rng, 250 * scale)
        + sdp_inputs(rng, 220 * scale, offers)
        + ice_inputs(rng, 160 * scale)
        + audio_inputs(rng, 220 * scale)
        + upload_inputs(rng, 150 * scale, offers)
    )
    rng.shuffle(inputs)
    return inputs
