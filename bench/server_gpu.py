"""The live server with the diffusion backend, measured end to end, with a profile of where block
time goes.

Starts the app in-process (`--random-weights 14b` on a GPU) and then, in order:
1. **the generator alone**: blocks run on the set's worker thread with no session streaming (no
   WebRTC, no event-loop work), at the full step count and at the fewest steps the governor uses:
   what the server's own process can do, to set against `liveavatar bench` (which leaves out
   wav2vec2 and the host copy of the frames) and against the live session;
2. **one live session**: a mic viewer in a process of its own (`bench/loopback_client.py`, so its
   VP8 decoding does not share this process's GIL) streams tests/assets/speech_with_pauses_48k.wav;
   measured here: generated fps, block time per stage (host and GPU), the worker thread's CPU share,
   torch.compile recompiles, the step counts the governor chose; measured by the viewer: received
   fps, lag against its bound, onset lag, dropped windows;
3. optionally a second session beside the first (`--two-seconds`);
4. memory: baseline, with sessions, and back after they left.
Writes server_gpu.json to --out (device, date, commit).

GPU:  python3 bench/server_gpu.py --engine compile --fp8 --out "$OUT"
CPU check of the script itself (tiny random weights, a minute):
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from liveavatar.generator import AudioWindow, AvatarSpec  # noqa: E402
from liveavatar.media_io import default_portrait_path, load_image  # noqa: E402
from server.app import App  # noqa: E402
from server.config import ServerConfig  # noqa: E402

GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for server_gpu.json")
    p.add_argument("--random-weights", default="14b", choices=("tiny", "14b"))
    p.add_argument("--size", default="704*384")
    p.add_argument("--sample-steps", type=int, default=4)
    p.add_argument("--motion-frames", type=int, default=73)
    p.add_argument("--engine", default="eager", choices=("eager", "compile"))
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--start-only", action="store_true", help="build, warm up and stop: time a (second) start")
    p.add_argument(
        "--gpus", type=int, default=1, help="GPUs used (one model replica per GPU, or sets of --gpus-per-session)"
    )
    p.add_argument(
        "--gpus-per-session", type=int, default=1, help="GPUs one session's blocks flow through (pipelined sets)"
    )
    p.add_argument("--alone-blocks", type=int, default=8, help="blocks of the generator alone, per step count")
    p.add_argument("--seconds", type=float, default=40.0, help="streaming time of the first session alone")
    p.add_argument("--two-seconds", type=float, default=0.0, help="streaming time with two sessions (0: skip)")
    return p.parse_args(argv)


def gpu_allocated_gib() -> float | None:
    """Memory this process's tensors hold on every GPU (synchronized first)."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = 0
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)
        total += torch.cuda.memory_allocated(i)
    return total / GIB


def gpu_used_gib() -> float | None:
    """Memory in use on every GPU, by any process (the ranks of a pipelined set hold theirs)."""
    import torch

    if not torch.cuda.is_available():
        return None
    used = 0
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        used += total - free
    return used / GIB


def compile_counters() -> dict[str, int]:
    """torch.compile's process-wide counts: graphs compiled so far and frames it recompiled."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "recompiles": int(sum(counters["recompiles"].values()) if "recompiles" in counters else 0),
    }


def median_profile(profiles: list[Any]) -> dict[str, float | None]:
    """Medians of BlockProfile fields (liveavatar backend); {} for backends that keep none."""
    if not profiles:
        return {}
    out: dict[str, float | None] = {}
    for name in ("audio_ms", "dit_ms", "vae_ms", "total_ms", "gpu_audio_ms", "gpu_dit_ms", "gpu_vae_ms"):
        values = [getattr(p, name) for p in profiles if getattr(p, name) is not None]
        out[name] = round(statistics.median(values), 1) if values else None
    return out


@dataclass
class _Interval:
    """A pipelined set's measured block interval in the shape of a BlockProfile (total only)."""

    total_ms: float
    steps: int
    audio_ms: float = 0.0
    dit_ms: float | None = None
    vae_ms: float | None = None
    gpu_audio_ms: float | None = None
    gpu_dit_ms: float | None = None
    gpu_vae_ms: float | None = None


async def generator_alone(app: App, steps: int, blocks: int) -> dict[str, Any]:
    """`blocks` blocks at `steps` on the first set's worker, nothing else running; medians of the last
    half (the first blocks fill the rings and redo the prefill)."""
    gset = app.sets[0]
    generator = gset.generator
    if generator.pipeline_depth > 1:  # a pipelined set: its interval when full, blocks in flight
        from liveavatar.backends.liveavatar.warmup import measure_pipeline

        block_s = await asyncio.to_thread(measure_pipeline, generator, blocks + generator.pipeline_depth)
        return {
            "steps": steps,
            "block_ms": round(block_s * 1e3, 1),
            "fps": round(generator.frames_per_block / block_s, 2),
            "profile": {"total_ms": round(block_s * 1e3, 1), "audio_ms": 0.0},
            "rank_busy_ms": [round(r * 1e3, 1) for r in generator.rank_seconds() or []],
            "plan": generator.plan,
        }
    image = load_image(default_portrait_path())
    state = await gset.worker.run("alone", generator.open, AvatarSpec(image, "alone", seed=7), app.size)
    try:
        if generator.step_control:
            generator.set_sample_steps(state, steps)
        times = []
        for i in range(blocks):
            window = AudioWindow(np.zeros(generator.audio_samples_per_block, np.float32), index=i)
            began = time.perf_counter()
            await gset.worker.run("alone", generator.step, state, window)
            times.append(time.perf_counter() - began)
        steady = times[blocks // 2 :]
        block_s = statistics.median(steady)
        profile = generator.block_profiles(state)[blocks // 2 :]
        return {
            "steps": steps,
            "block_ms": round(block_s * 1e3, 1),
            "fps": round(generator.frames_per_block / block_s, 2),
            "profile": median_profile(profile),
        }
    finally:
        await gset.worker.run("alone", generator.close, state)


class StartLog(logging.Handler):
    """The server's INFO lines during start-up with their time from the start (seconds), so a slow start
    shows which phase took the time (model build, first avatar, each warm-up block, the compile cache)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.began = time.monotonic()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((round(time.monotonic() - self.began, 1), record.getMessage()[:200]))


async def memory_gib(app: App) -> float | None:
    """What tensors hold on the GPUs: each set's generator counts its own (a pipelined set asks its
    rank processes, so off the event loop); else this process's allocations."""
    counts = [await asyncio.to_thread(s.generator.memory_allocated) for s in app.sets]
    if any(c is None for c in counts):
        return gpu_allocated_gib()
    return sum(counts) / GIB


async def live_session(
    app: App, args: argparse.Namespace, seconds: float, out: Path, tag: str
) -> tuple[Any, dict[str, Any]]:
    """Start a viewer process; once its session streams, measure it here for `seconds`."""
    url = app.url.replace("http", "ws") + "ws"
    known = {s.id for s in app.registry}
    client_json = out / f"client_{tag}.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "loopback_client.py"),
        "--url",
        url,
        "--seconds",
        str(seconds),
        "--out",
        str(client_json),
        stdout=asyncio.subprocess.PIPE,
    )
    line = await proc.stdout.readline()  # the client prints its first-frame line once video flows
    session = next((s for s in app.registry if s.id not in known), None)
    if session is None:
        raise RuntimeError(f"the viewer's session did not open: {line!r}")
    gset = app.sets.of(session.id)
    state = session.stream._state  # kept here: the session drops it when it closes
    counters0, blocks0, t0 = compile_counters(), session.stream.blocks, time.monotonic()
    gset.worker.cpu_share.clear()
    steps_seen: dict[int, int] = {}
    state_gib = gpu_gib = None
    made: list[tuple[float, int]] = []  # (when, blocks made so far) at each block's delivery, ±20 ms
    seen, polls = session.stream.blocks, 0
    while proc.returncode is None and time.monotonic() - t0 < seconds:
        if polls % 25 == 0:
            steps_seen[session.stream.sample_steps] = steps_seen.get(session.stream.sample_steps, 0) + 1
        if time.monotonic() - t0 > seconds / 2 and state_gib is None:  # mid-run: the session is surely up
            state_gib, gpu_gib = session.holding_nbytes() / GIB, await memory_gib(app)
        if session.stream.blocks != seen:
            seen = session.stream.blocks
            made.append((time.monotonic(), seen))
        polls += 1
        await asyncio.sleep(0.02)
    took = time.monotonic() - t0
    # From the first block delivered in the window to the last: a rate, free of the window's edges (the
    # blocks in flight when it opens and closes), which counted up to 3 blocks short over 60 s.
    frames = app.generator.frames_per_block
    generated = 0.0
    if len(made) >= 2 and made[-1][0] > made[0][0]:
        (first_t, first_n), (last_t, last_n) = made[0], made[-1]
        generated = (last_n - first_n) * frames / (last_t - first_t)
    profile = gset.generator.block_profiles(state)
    rank_ms = None
    if gset.generator.pipeline_depth > 1:  # no per-stage profile: the pipeline's block interval
        interval = gset.worker.load.block_seconds() or 0.0
        profile = [_Interval(interval * 1e3, session.stream.sample_steps or app.config.sample_steps)]
        rank_ms = [round(r * 1e3, 1) for r in gset.generator.rank_seconds() or []]
    counters1 = compile_counters()
    result = {
        "generated_fps": round(generated, 2),
        "generated_fps_window": round((session.stream.blocks - blocks0) * frames / took, 2),
        "blocks": session.stream.blocks - blocks0,
        "profile": median_profile(profile),
        "profile_by_steps": {
            steps: median_profile([p for p in profile if p.steps == steps])
            for steps in sorted({p.steps for p in profile})
        },
        "worker_cpu_share": round(statistics.median(gset.worker.cpu_share), 2) if gset.worker.cpu_share else None,
        "compiles_during_session": {k: counters1[k] - counters0[k] for k in counters1},
        "steps_time_share": {k: round(v / max(1, sum(steps_seen.values())), 2) for k, v in sorted(steps_seen.items())},
        "governor_changes": gset.governor.changes if gset.governor else 0,
        "rank_busy_ms": rank_ms,
        "session_state_gib": state_gib,
        "gpu_with_session_gib": gpu_gib,
    }
    await proc.wait()
    result |= json.loads(client_json.read_text())
    return session, result


async def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        backend="liveavatar",
        random_weights=args.random_weights,
        size=args.size,
        sample_steps=args.sample_steps,
        motion_frames=args.motion_frames,
        engine=args.engine,
        fp8=args.fp8,
        cuda_graphs=args.cuda_graphs,
        realtime_capacity=0,
        max_sessions=2,
        log_level="info",
        gpus=args.gpus,
        gpus_per_session=args.gpus_per_session,
    ).validate()
    started = time.monotonic()
    start_log = StartLog()
    logging.getLogger().addHandler(start_log)
    app = App(config)
    try:
        await app.start()
    finally:
        logging.getLogger().removeHandler(start_log)
    result: dict[str, Any] = {
        "start_s": round(time.monotonic() - started, 1),
        "start_log": start_log.lines,
        "model": app.model.to_message(),
        "size": str(app.size),
        "baseline_gib": await memory_gib(app),
        "baseline_used_gib": gpu_used_gib(),
        "session_estimate_gib": round(app.admission.estimate(app.size) / GIB, 2),
    }
    print(json.dumps(result), flush=True)
    if args.start_only:
        await app.stop()
        return result
    try:
        gov = app.sets[0].governor
        fewest = gov.min_steps if gov else args.sample_steps
        result["alone"] = [
            await generator_alone(app, s, args.alone_blocks) for s in sorted({args.sample_steps, fewest}, reverse=True)
        ]
        print(json.dumps(result["alone"]), flush=True)
        first, result["one_session"] = await live_session(app, args, args.seconds, out, "one")
        result["one_session_gib"] = result["one_session"]["gpu_with_session_gib"]
        print(json.dumps(result["one_session"]), flush=True)
        if args.two_seconds > 0:
            second, result["two_sessions"] = await live_session(app, args, args.two_seconds, out, "two")
            result["two_sessions_gib"] = await memory_gib(app)
            del second
        del first
        while len(app.registry):
            await asyncio.sleep(0.1)
        gc.collect()
        await asyncio.sleep(1.0)  # the ranks of a pipelined set free the session after its close
        result["after_close_gib"] = await memory_gib(app)
        result["after_close_used_gib"] = gpu_used_gib()  # with what allocators cache, contexts, NCCL
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


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("websockets", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit(), "args": vars(args)}
    result |= asyncio.run(run(args, out))
    (out / "server_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
