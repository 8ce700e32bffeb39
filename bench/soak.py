"""Soak: N preview sessions for M minutes against `liveavatar serve` in its own process.

Each session is a mic viewer (tests/server_peer.py) speaking a looped speech file. Reported per
session: received fps, audio received (samples received over the media time its timestamps span:
a skip in the audio shows as a gap), and the A/V offset in the first and the last minute; for the
server: its RSS over time. The offset is the one a browser lines the tracks up by: from the RTCP
sender reports, when the server sent media time t on the video minus when it sent t on the audio
(both tracks start at media time 0; positive: the video goes out later than its sound).

Not part of the test suite (it runs for minutes). Writes JSON and prints a table:

    python3 bench/soak.py --sessions 2 --minutes 30 --out bench/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import wait_http  # noqa: E402
from processes import free_port, stop_process  # noqa: E402
from server_peer import CLOCK_RATE, ArrayAudioTrack, PeerClient, Received, fps_by_arrival  # noqa: E402

from liveavatar.media_io import decode_audio  # noqa: E402

SPEECH = ROOT / "tests" / "assets" / "speech_with_pauses_48k.wav"
RSS_EVERY_S = 10.0
WINDOW_S = 60.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def av_offset_ms(got: Received, since: float, until: float) -> float | None:
    """Median A/V offset over the sender reports whose server time lies in [since, until) (wall clock,
    the same machine): per track, the server time of media time 0 by each report; video minus audio."""
    zero: dict[str, list[float]] = {}
    for kind in ("video", "audio"):
        origin = got.rtp_origin.get(kind)
        if origin is None:
            return None
        rate = CLOCK_RATE[kind]
        zero[kind] = [
            ntp - ((rtp - origin) % 2**32) / rate
            for ntp, rtp in got.reports[kind]
            if since <= ntp - 2_208_988_800 < until
        ]
    if not zero["video"] or not zero["audio"]:
        return None
    return (statistics.median(zero["video"]) - statistics.median(zero["audio"])) * 1000


def audio_received(got: Received) -> tuple[float, float]:
    """(seconds received, percent of the media time the received timestamps span)."""
    if not got.audio:
        return 0.0, 0.0
    samples = sum(len(a) for _, _, a in got.audio)
    span = got.audio[-1][1] - got.audio[0][1] + len(got.audio[-1][2])
    return samples / 48_000, 100.0 * samples / max(span, 1)


async def soak(url: str, pid: int, sessions: int, seconds: float) -> dict[str, Any]:
    speech = (decode_audio(SPEECH, rate=48_000).samples * 32767).astype(np.int16)
    clients = [await PeerClient(url, keep_video=False).connect() for _ in range(sessions)]
    answers = await asyncio.gather(
        *(c.start(mode="mic", mic=ArrayAudioTrack(speech, loop=True)) for c in clients), return_exceptions=True
    )
    refused = [str(a) for a in answers if isinstance(a, BaseException)]
    wall0 = time.time()
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        rss.append((round(elapsed, 1), round(rss_mib(pid), 1)))
        await asyncio.sleep(min(RSS_EVERY_S, seconds - elapsed))
    rss.append((round(time.monotonic() - t0, 1), round(rss_mib(pid), 1)))
    wall1 = time.time()
    results = []
    for c in clients:
        got = c.got
        received_s, percent = audio_received(got)
        results.append(
            {
                "session": c.session,
                "fps": round(fps_by_arrival([t for t, _, _ in got.video]), 2),
                "video_frames": len(got.video),
                "audio_received_s": round(received_s, 2),
                "audio_received_pct": round(percent, 2),
                "av_offset_start_ms": _round(av_offset_ms(got, wall0, wall0 + WINDOW_S)),
                "av_offset_end_ms": _round(av_offset_ms(got, wall1 - WINDOW_S, wall1)),
                "errors": [m for m in c.messages if m.get("type") == "error"],
            }
        )
    for c in clients:
        await c.close()
    await asyncio.sleep(2)  # the sessions close on the server
    return {"sessions": results, "refused": refused, "rss_mib": rss, "rss_after_close_mib": round(rss_mib(pid), 1)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def table(report: dict[str, Any]) -> str:
    lines = [f"{'session':<18} {'fps':>6} {'audio %':>8} {'A/V start ms':>13} {'A/V end ms':>11}"]
    for s in report["sessions"]:
        lines.append(
            f"{s['session'] or '-':<18} {s['fps']:>6.2f} {s['audio_received_pct']:>8.2f} "
            f"{s['av_offset_start_ms'] if s['av_offset_start_ms'] is not None else '-':>13} "
            f"{s['av_offset_end_ms'] if s['av_offset_end_ms'] is not None else '-':>11}"
        )
    rss = report["rss_mib"]
    after_warmup = [m for t, m in rss if t >= min(60.0, rss[-1][0] / 3)]
    lines.append(
        f"server RSS MiB: start {rss[0][1]}, after warm-up {after_warmup[0]}, end {rss[-1][1]}, "
        f"max {max(m for _, m in rss)}, after the sessions closed {report['rss_after_close_mib']}"
    )
    if report["refused"]:
        lines.append(f"refused: {report['refused']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=2)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--out", default="", help="JSON file to write (default: print only)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `liveavatar serve` argument (repeatable)")
    args = p.parse_args()
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-sessions",
        str(max(4, args.sessions)),
        *args.server_arg,
    ]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        idle = rss_mib(server.pid)
        report = asyncio.run(soak(f"ws://127.0.0.1:{port}/ws", server.pid, args.sessions, args.minutes * 60))
    finally:
        stop_process(server, timeout=10)
    report = {
        "sessions_asked": args.sessions,
        "minutes": args.minutes,
        "cpus": os.cpu_count(),
        "rss_idle_mib": round(idle, 1),
        **report,
    }
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
