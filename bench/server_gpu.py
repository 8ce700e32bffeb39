"""The server with the diffusion backend, measured end to end from a loopback WebRTC client.

Starts the app in-process (`--random-weights 14b`, built directly on the GPU in bf16), streams
tests/assets/speech_with_pauses_48k.wav as a microphone from an aiortc client (tests/server_peer.py),
then adds a second session, and writes one JSON to --out: first-frame time, generated and received fps,
speech-onset -> frame lag, the lag bound, GPU memory per session and with two sessions, whether memory
went back to the baseline after both left, device, date and commit.

GPU (one H200, ~5 min with the model build):
    python3 bench/server_gpu.py --out "$OUT"
CPU check of the script itself (tiny random weights):
    python3 bench/server_gpu.py --random-weights tiny --size 128*128 --motion-frames 5 --seconds 8 --out /tmp/sg
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
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

from server_peer import ArrayAudioTrack, PeerClient, fps_by_arrival  # noqa: E402

from liveavatar.media_io import decode_audio  # noqa: E402
from server.app import App  # noqa: E402
from server.config import ServerConfig  # noqa: E402

SPEECH = ROOT / "tests" / "assets" / "speech_with_pauses_48k.wav"
GIB = 2**30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for server_gpu.json")
    p.add_argument("--random-weights", default="14b", choices=("tiny", "14b"))
    p.add_argument("--size", default="704*384")
    p.add_argument("--sample-steps", type=int, default=4)
    p.add_argument("--motion-frames", type=int, default=73)
    p.add_argument("--engine", default="eager", choices=("eager", "compile"))
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--gpus", type=int, default=1, help="GPU sets (one model replica per GPU); the second session lands on set 1")
    p.add_argument("--seconds", type=float, default=40.0, help="streaming time of the first session alone")
    p.add_argument("--two-seconds", type=float, default=20.0, help="streaming time with two sessions")
    return p.parse_args()


class Memory:
    """torch.cuda figures (all None on CPU)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()

    def allocated(self) -> float | None:
        """Summed over the visible GPUs (with --gpus N the sessions sit on different ones)."""
        if not self.cuda:
            return None
        torch = self.torch
        return sum(_synced(torch, i) for i in range(torch.cuda.device_count())) / GIB

    def peak(self) -> float | None:
        if not self.cuda:
            return None
        return sum(self.torch.cuda.max_memory_allocated(i) for i in range(self.torch.cuda.device_count())) / GIB

    def device(self) -> str:
        return self.torch.cuda.get_device_name() if self.cuda else "cpu"


def _synced(torch: Any, index: int) -> int:
    torch.cuda.synchronize(index)
    return torch.cuda.memory_allocated(index)


def first_real_frame(client: PeerClient, since: float) -> float | None:
    """Seconds from `since` to the first received frame with content (the clock sends blank before)."""
    for t, _, img in client.got.video:
        if img is not None and img.std() > 2.0:
            return t - since
    return None


async def stream_one(app: App, speech: np.ndarray, seconds: float, others: tuple[Any, ...] = ()) -> tuple[PeerClient, dict]:
    """One more mic session; after its first frame, `seconds` of streaming, timing every session."""
    ws = app.url.replace("http", "ws") + "ws"
    client = await PeerClient(ws, thumb=64).connect()
    offered = time.monotonic()
    await client.start(mode="mic", mic=ArrayAudioTrack(speech), prompt="a person talking to the camera")
    session = app.registry.get(client.session)
    assert session is not None
    while first_real_frame(client, offered) is None and time.monotonic() - offered < 600:
        await asyncio.sleep(0.05)
    first = first_real_frame(client, offered)
    everyone = (session, *others)
    t0, b0 = time.monotonic(), [s.blocks for s in everyone]
    await asyncio.sleep(seconds)
    took = time.monotonic() - t0
    fps = [round((s.blocks - b) * app.generator.frames_per_block / took, 2) for s, b in zip(everyone, b0, strict=True)]
    return client, {"first_frame_s": first, "generated_fps": fps[0], "others_generated_fps": fps[1:], "session": session}


def lag_figures(client: PeerClient) -> dict[str, Any]:
    stats = [m for m in client.messages if m.get("type") == "stats"]
    onset = [m["onsetLagMs"] for m in stats if m.get("onsetLagMs") is not None]
    lag = [m["lagMs"] for m in stats if m.get("lagMs") is not None]
    last = stats[-1] if stats else {}
    return {
        "received_fps": round(fps_by_arrival([t for t, _, _ in client.got.video], skip_s=3.0), 2),
        "onset_lag_ms_median": statistics.median(onset) if onset else None,
        "onset_lag_ms_max": max(onset) if onset else None,
        "lag_ms_median": statistics.median(lag) if lag else None,
        "lag_ms_max": max(lag) if lag else None,
        "max_lag_ms_bound": last.get("maxLagMs"),
        "sample_steps_last": last.get("sampleSteps"),
        "trimmed_frames": last.get("trimmedFrames"),
        "underrun_frames": last.get("underrunFrames"),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    mem = Memory()
    speech = (decode_audio(SPEECH, rate=48_000).samples * 32767).astype(np.int16)
    config = ServerConfig(
        host="127.0.0.1", port=0, backend="liveavatar", random_weights=args.random_weights, size=args.size,
        sample_steps=args.sample_steps, motion_frames=args.motion_frames, engine=args.engine, fp8=args.fp8,
        realtime_capacity=0, max_sessions=2, log_level="info", gpus=args.gpus,
    ).validate()  # fmt: skip
    started = time.monotonic()
    app = App(config)
    await app.start()
    result: dict[str, Any] = {
        "model_build_s": round(time.monotonic() - started, 1),
        "model": app.model.to_message(),
        "size": str(app.size),
        "baseline_gib": mem.allocated(),
        "session_estimate_gib": round(app.admission.estimate(app.size) / GIB, 2),
    }
    print(json.dumps(result), flush=True)
    try:
        one, first = await stream_one(app, speech, args.seconds)
        result["one_session"] = {k: v for k, v in first.items() if k != "session"} | lag_figures(one)
        result["one_session_gib"] = mem.allocated()
        result["one_session_state_gib"] = first["session"].holding_nbytes() / GIB
        print(json.dumps(result["one_session"]), flush=True)
        two, second = await stream_one(app, speech, args.two_seconds, (first["session"],))
        result["sets_of_sessions"] = [app.sets.of(s.id).index for s in (first["session"], second["session"])]
        result["two_sessions"] = {
            "second_first_frame_s": second["first_frame_s"],
            "generated_fps_each": [*second["others_generated_fps"], second["generated_fps"]],
            **{f"second_{k}": v for k, v in lag_figures(two).items()},
        }
        result["one_session"].pop("others_generated_fps", None)
        result["two_sessions_gib"] = mem.allocated()
        result["peak_gib"] = mem.peak()
        del first, second
        await one.close()
        await two.close()
        while len(app.registry):
            await asyncio.sleep(0.1)
        gc.collect()
        result["after_close_gib"] = mem.allocated()
        if result["baseline_gib"] is not None:
            result["memory_back_to_baseline"] = abs(result["after_close_gib"] - result["baseline_gib"]) < 0.05
    finally:
        await app.stop()
    return result


def commit() -> str:
    """The commit measured: LIVEAVATAR_COMMIT when set (the GPU machine gets the tree without .git)."""
    if os.environ.get("LIVEAVATAR_COMMIT"):
        return os.environ["LIVEAVATAR_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("websockets", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": Memory().device(), "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit()}
    result |= asyncio.run(run(args))
    (out / "server_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
