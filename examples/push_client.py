"""Drive a liveavatar session from your own app: push a WAV file, follow playback, record the result.

    python examples/push_client.py tests/assets/speech_en_16k.wav --record avatar.mp4

Needs only `websockets`, `aiortc` and `av` (see docs/protocol.md for the messages).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import av
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole, MediaRecorder


def read_pcm16k(path: str) -> bytes:
    """Any audio file -> 16 kHz mono s16le, the server's native push format."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16_000)
    chunks = []
    with av.open(path) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype("<i2").tobytes()


async def main(url: str, wav: str, record: str | None) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        config = json.loads(await ws.recv())
        print(f"server backend: {config['backend']}, {config['size']} at {config['fps']} fps")

        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        sink = MediaRecorder(record) if record else MediaBlackhole()
        pc.on("track", sink.addTrack)
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers ICE candidates here
        await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp, "mode": "push"}))

        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "answer":
                await pc.setRemoteDescription(RTCSessionDescription(msg["sdp"], "answer"))
                await sink.start()
                pcm = read_pcm16k(wav)
                for i in range(0, len(pcm), 6400):  # 0.2 s per binary frame
                    await ws.send(pcm[i : i + 6400])
                await ws.send(json.dumps({"type": "push_end"}))
                print(f"session {msg['session']}: pushed {len(pcm) / 32000:.2f} s of audio")
            elif msg["type"] in ("started", "speech_start", "speech_end"):
                print(msg)
            elif msg["type"] == "finished":
                print(f"finished utterance {msg['utterance']} after {msg['position']:.2f} s")
                await asyncio.sleep(0.5)  # let the last frames arrive
                break
            elif msg["type"] == "error":
                raise SystemExit(f"server error {msg['code']}: {msg['message']}")
        await sink.stop()
        await pc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wav", help="audio file to speak (any format PyAV reads)")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    parser.add_argument("--record", help="save the avatar's video+audio here (e.g. out.mp4)")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.wav, args.record))
