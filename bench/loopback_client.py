"""One viewer in a process of its own: a mic session streaming speech to a running server.

The measuring script (`bench/server_gpu.py`) runs the server; the viewer's WebRTC work (decoding
VP8, the DTLS/SRTP stack) runs here, so it does not compete with the server for the server
process's GIL and the server's figures are what a remote viewer would cause. Writes one JSON:
first-frame time, received fps, and the lag figures of the server's `stats` messages.

    python3 bench/loopback_client.py --url ws://127.0.0.1:8080/ws --seconds 40 --out client.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from server_peer import ArrayAudioTrack, PeerClient, fps_by_arrival  # noqa: E402

from liveavatar.media_io import decode_audio  # noqa: E402

SPEECH = ROOT / "tests" / "assets" / "speech_with_pauses_48k.wav"


def first_real_frame(client: PeerClient, since: float) -> float | None:
    """Seconds from `since` to the first received frame with content (the poster is flat)."""
    for t, _, img in client.got.video:
        if img is not None and img.std() > 2.0:
            return t - since
    return None


def lag_figures(client: PeerClient, since: float) -> dict[str, Any]:
    """The server's `stats` messages received after `since` (index into client.messages)."""
    stats = [m for m in client.messages[int(since) :] if m.get("type") == "stats"]
    onset = [m["onsetLagMs"] for m in stats if m.get("onsetLagMs") is not None]
    lag = [m["lagMs"] for m in stats if m.get("lagMs") is not None]
    bounds = [m["maxLagMs"] for m in stats if m.get("maxLagMs") is not None]
    over = [m["lagMs"] - m["maxLagMs"] for m in stats if m.get("lagMs") is not None and m.get("maxLagMs")]
    last = stats[-1] if stats else {}
    return {
        "received_fps": round(fps_by_arrival([t for t, _, _ in client.got.video], skip_s=3.0), 2),
        "onset_lag_ms_median": statistics.median(onset) if onset else None,
        "onset_lag_ms_max": max(onset) if onset else None,
        "lag_ms_median": statistics.median(lag) if lag else None,
        "lag_ms_max": max(lag) if lag else None,
        "max_lag_ms_bound": max(bounds) if bounds else None,
        "lag_over_bound_ms_max": max(over) if over else None,
        "sample_steps_seen": sorted({m.get("sampleSteps") for m in stats if m.get("sampleSteps")}),
        "sample_steps_last": last.get("sampleSteps"),
        "trimmed_frames": last.get("trimmedFrames"),
        "underrun_frames": last.get("underrunFrames"),
        "dropped_windows": last.get("droppedWindows"),
        "realtime": last.get("realtime"),
        "errors": [m for m in client.messages if m.get("type") == "error"],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    speech = (decode_audio(SPEECH, rate=48_000).samples * 32767).astype(np.int16)
    speech = np.tile(speech, int(np.ceil((args.seconds + 30) * 48_000 / len(speech))))
    client = await PeerClient(args.url, thumb=64).connect()
    offered = time.monotonic()
    await client.start(mode="mic", mic=ArrayAudioTrack(speech), prompt="a person talking to the camera")
    while first_real_frame(client, offered) is None and time.monotonic() - offered < args.first_frame_timeout:
        await asyncio.sleep(0.05)
    first = first_real_frame(client, offered)
    mark = len(client.messages)
    print(json.dumps({"session": client.session, "first_frame_s": first}), flush=True)
    await asyncio.sleep(args.seconds)
    result = {"session": client.session, "first_frame_s": first, "seconds": args.seconds} | lag_figures(client, mark)
    await client.close()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server's WebSocket URL (ws://host:port/ws)")
    p.add_argument("--seconds", type=float, default=40.0, help="streaming time after the first frame")
    p.add_argument("--first-frame-timeout", type=float, default=300.0)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
