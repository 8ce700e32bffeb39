"""GStreamer's webrtcbin (Debian's GStreamer 1.22) as the client, in mic and push mode, VP8 and H.264.

webrtcbin offers `actpass` with an RSA certificate and trickles its candidates after the offer; the
peer runs as a child process under Debian's Python (tests/gst_peer.py says why). Frame rate is judged
over media time: frames received divided by the span of their presentation timestamps, which
webrtcbin derives from the RTP timestamps. What is judged is the interop, not this box's encoder: the
server runs at 256*256, and frames its encoder skipped under load (a documented server behaviour,
`frames_dropped_total`; once seen on a 2-core CI box at 512*512 H.264) count as sent.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from server_peer import PeerClient

from liveavatar.media_io import decode_audio

GST_PYTHON = "/usr/bin/python3"
PEER = Path(__file__).with_name("gst_peer.py")


def webrtcbin_ready() -> bool:
    check = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0');"
        "from gi.repository import Gst, GstWebRTC; Gst.init(None);"
        "assert all(Gst.ElementFactory.find(e) for e in ('webrtcbin', 'nicesrc', 'vp8dec', 'avdec_h264', 'opusenc'))"
    )
    if not os.path.exists(GST_PYTHON):
        return False
    return subprocess.run([GST_PYTHON, "-c", check], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not webrtcbin_ready(), reason="GStreamer webrtcbin for Debian's python3 is absent (bash docker/install.sh --dev)"
)


def media_fps(pts: list[float | None], skip_s: float = 1.0, skipped: int = 0) -> float:
    """Frames per second of media time, after the first `skip_s` of it; `skipped`: frames the sender
    skipped, which leave gaps in the timestamps, counted as if received."""
    times = [t for t in pts if t is not None]
    steady = [t for t in times if t >= times[0] + skip_s]
    return (len(steady) - 1 + skipped) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0


class GstPeer:
    """The webrtcbin child process and the signalling between it and the server."""

    def __init__(self, proc: asyncio.subprocess.Process, client: PeerClient, mode: str) -> None:
        self.proc, self.client, self.mode = proc, client, mode
        self.report: dict = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, client: PeerClient, mode: str, codec: str) -> GstPeer:
        proc = await asyncio.create_subprocess_exec(
            GST_PYTHON,
            str(PEER),
            "--mode",
            mode,
            "--codec",
            codec,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        return cls(proc, client, mode)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            message = json.loads(line)
            if "offer" in message:
                await self.client.send({"type": "offer", "sdp": message["offer"], "mode": self.mode})
                answer = await self.client.wait_for("answer", timeout=20)
                self.client.session = answer["session"]
                self._tell({"answer": answer["sdp"]})
            elif "ice" in message:
                await self.client.send({"type": "ice", "candidate": message["ice"], "sdpMLineIndex": message["mline"]})
            elif "report" in message:
                self.report = message["report"]

    def _tell(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def stop(self) -> dict:
        if self.proc.returncode is None:
            self._tell({"stop": True})
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.wait_for(self._reader, 5)
        return self.report


async def wait_connected(app, client: PeerClient, timeout: float = 15.0) -> float:
    """Seconds until the server's side of the session is connected."""
    t0 = time.monotonic()
    while True:
        session = app.registry.get(client.session) if client.session else None
        if (
            session is not None
            and session.transport.pc is not None
            and session.transport.pc.connectionState == "connected"
        ):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"no connection in {timeout} s; messages {client.types()}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("mode", "codec"), [("mic", "vp8"), ("mic", "h264"), ("push", "vp8"), ("push", "h264")])
async def test_gstreamer_webrtcbin_receives_the_avatar_at_full_rate(start_server, assets, mode, codec) -> None:
    app = await start_server(size="256*256")
    client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
    peer = await GstPeer.start(client, mode, codec)
    try:
        await wait_connected(app, client)
        if mode == "push":
            speech = decode_audio(assets / "speech_en_48k.wav", rate=16_000).samples[: 16_000 * 3]
            pcm = (speech * 32767).astype("<i2")
            for i in range(0, len(pcm), 3200):  # 0.2 s chunks, twice as fast as they play
                await client.send(pcm[i : i + 3200].tobytes())
                await asyncio.sleep(0.1)
            await client.send({"type": "push_end"})
            finished = await client.wait_for("finished", timeout=15)
        else:
            await asyncio.sleep(4)
        answer = next(m for m in client.messages if m["type"] == "answer")
    finally:
        report = await peer.stop()
        await client.close()
    skipped = app.metrics.frames_dropped
    fps = media_fps(report["video_pts"], skipped=skipped)
    rms = math.sqrt(report["audio_sum_squares"] / max(1, report["audio_samples"]))
    print(
        f"webrtcbin {mode} {codec}: connected {report['connected_s']:.2f} s, first frame "
        f"{report['first_frame_s']:.2f} s, {fps:.1f} fps over media time, "
        f"{len(report['video_pts'])} frames ({skipped} skipped by the encoder), "
        f"audio {report['audio_samples'] / 48_000:.1f} s rms {rms:.3f}"
    )
    assert answer["videoCodec"].lower() == codec
    assert "a=setup:passive" in answer["sdp"]  # webrtcbin (RSA certificate) is the DTLS client
    assert fps >= 24
    assert skipped <= 25, f"the encoder skipped {skipped} frames: more than a second of video"
    assert report["audio_samples"] >= 48_000 and rms > 0.005
    if mode == "push":
        assert finished["interrupted"] is False and finished["position"] > 2.9
    np.testing.assert_array_less(0, len(report["video_pts"]))
