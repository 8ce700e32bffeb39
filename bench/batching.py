"""Would two sessions sharing one GPU gain from one batched forward instead of two interleaved ones?

Issue 11, item 5: "where two sessions share a GPU at a launch-bound size, batch their blocks through the
same forward when that is faster than interleaving them". This measures the premise before any batching
is built. A batch of two sessions' blocks does exactly the work of one forward over 6 latent frames of
one session in the steady state, token for token:

- every linear layer (QKV, output, cross-attention, FFN, modulation) sees 2 x 3 frames of tokens, as a
  batch of two would (the per-frame time modulation is per token group either way);
- each query attends to the condition tokens plus the 12 ring frames, which hold the block itself, so
  6 frames x (cond + 12 frames) keys is the attention work of 2 x 3 frames x (cond + 12 frames).

So `t(6 frames)` is the time a batched forward of two sessions would take (before any extra cost of
stacking their caches), and `2 x t(3 frames)` the time interleaving takes. Both are measured the way the
live path runs (compile + FP8 + fused RoPE, CUDA graphs replayed in the steady state), with CUDA events,
median of `--repeats` forwards after the warm-up and the capture. Random 14B weights (speed does not
depend on their values).

    python3 bench/batching.py --size 384*256 --size 704*384 --json OUT/batching.json

`--real` measures the batched forward itself (`StreamingDiT.denoise_batch`, what the server runs): two
sessions with different inputs, at different frame positions and sink shifts, in the steady state; per
denoising step one batched forward of both (its own CUDA graphs) against the two forwards alone (theirs),
on the same inputs and caches, and the batched velocities checked against the alone ones (relative L2
error and largest difference: not bitwise on a GPU, where FP8 batches use the row-wise scaled kernel
and a larger batch may take other kernels; `--tolerance` is the pass mark). Each step continues from the
alone results, so both stay on one trajectory.

    python3 bench/batching.py --real --size 384*256 --size 512*256 --json OUT/batching_real.json

CPU check of the script itself (tiny random weights, eager, no graphs; seconds):

    python3 bench/batching.py --real --arch tiny --size 128*128

`--live` shows it in the live server: the app in this process (14B random weights, compile + FP8 +
CUDA graphs, the first `--size`), two mic viewers at once (`bench/loopback_client.py`, each in a process
of its own) for `--seconds`, then the same with batching turned off; per run the generated fps of each
session, the blocks made in batches, the steps the governor chose and the worker's block time.

    python3 bench/batching.py --live --size 384*256 --seconds 30 --json OUT/batching_live.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
from typing import Any

from liveavatar.version import source_commit


def measure(size: str, repeats: int, cuda_graphs: bool) -> dict[str, Any]:
    """Milliseconds per denoising forward at 3 and at 6 latent frames for one output size."""
    import torch

    from liveavatar.bench import _config, build_stream, make_inputs
    from liveavatar.models.config import output_size
    from liveavatar.streaming.dit import KVRing, frame_tokens

    device = torch.device("cuda", 0)
    width, height = output_size(size)
    lh, lw = height // 8, width // 8
    opts = {
        "ckpt_dir": None,
        "arch": "14b",
        "fp8": True,
        "engine": "compile",
        "compile_backend": "inductor",
        "compile_rope": True,
        "attention": "auto",
        "steps": 4,
        "cuda_graphs": cuda_graphs,
    }
    stream, attention = build_stream(opts, device, lh, lw)
    cfg = _config(opts)
    inputs = make_inputs(cfg, device, lh, lw)
    state = stream.new_state(inputs.ref_latent, inputs.motion_latents, inputs.text_context, inputs.seed)
    stream.refresh_condition(state)  # the prefill: the condition K/V every forward attends to
    branch, dit = state.branches[0], stream.dit
    feats = inputs.audio_feats[0]
    result: dict[str, Any] = {"size": f"{width}*{height}", "attention": attention}
    for frames in (3, 6):
        ring = KVRing(cfg.num_layers, frame_tokens(lh, lw))
        audio = dit.encode_audio(feats.repeat(1, 1, frames // 3))
        g = torch.Generator(device=device).manual_seed(frames)
        latents = torch.randn(16, frames, lh, lw, device=device, dtype=dit.dtype, generator=g)
        times: list[float] = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(4 + repeats):  # fill the ring (12 frames), compile, capture, then measure
            frame_start = (i * frames) % 24 + 24  # steady state: the ring is full from frame 12 on
            start.record()
            stream.forward(branch, ring, latents, 0.5, audio, frame_start, frame_start + 10)
            end.record()
            end.synchronize()
            if i >= 4:
                times.append(start.elapsed_time(end))
        result[f"forward_ms_{frames}f"] = round(statistics.median(times), 2)
        del ring
    one, two = result["forward_ms_3f"], result["forward_ms_6f"]
    result["interleaved_ms"] = round(2 * one, 2)
    result["batched_ms"] = two
    result["batched_over_interleaved"] = round(two / (2 * one), 3)
    result["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def measure_real(size: str, blocks: int, cuda_graphs: bool, arch: str = "14b") -> dict[str, Any]:
    """The real batched forward of two sessions against the same two forwards alone, at one size. `arch`
    "tiny" runs on the CPU when there is no GPU (eager, no graphs: a check of this script)."""
    import torch

    from liveavatar.bench import _config, build_stream
    from liveavatar.models.config import output_size
    from liveavatar.streaming.dit import StreamState

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    width, height = output_size(size)
    lh, lw = height // 8, width // 8
    opts = {
        "ckpt_dir": None,
        "arch": arch,
        "fp8": True,
        "engine": "compile" if cuda else "eager",
        "compile_backend": "inductor",
        "compile_rope": True,
        "attention": "auto",
        "steps": 4,
        "cuda_graphs": cuda_graphs and cuda,
    }
    stream, attention = build_stream(opts, device, lh, lw)
    cfg = _config(opts)
    audio: dict[int, list[Any]] = {}

    def session(seed: int) -> StreamState:
        g = torch.Generator().manual_seed(seed)
        ref, motion = torch.randn(16, 1, lh, lw, generator=g), torch.randn(16, 19, lh, lw, generator=g)
        text = torch.randn(40 + seed % 17, cfg.text_dim, generator=g)
        state = stream.new_state(ref.to(device), motion.to(device), text.to(device), seed)
        audio[state.serial] = [
            torch.randn(cfg.audio_layers, cfg.audio_dim, 12, generator=g).to(device) for _ in range(4)
        ]
        return state

    def feats(state: StreamState) -> Any:
        return audio[state.serial][(state.frame // 3) % 4]

    a, b = session(101), session(202)
    for _ in range(5):  # ring full and the adaptive sink's prefill done; b one block ahead of a
        stream.step(a, feats(a))
    for _ in range(6):
        stream.step(b, feats(b))

    def timed(fn: Any) -> tuple[Any, float]:
        """fn() and its milliseconds: CUDA events on the GPU, the host clock on the CPU."""
        if not cuda:
            began = time.perf_counter()
            return fn(), (time.perf_counter() - began) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end)

    batched_ms: list[float] = []
    alone_ms: list[float] = []
    errors: list[float] = []
    worst = 0.0
    for n in range(blocks):
        pair = [stream.begin_block(st, feats(st)) for st in (a, b)]
        for s in range(stream.sample_steps):
            together, t_batch = timed(lambda s=s, pair=pair: stream.denoise_batch([a, b], pair, s))
            alone, t_alone = timed(
                lambda s=s, pair=pair: [stream.denoise(st, blk, s) for st, blk in zip((a, b), pair, strict=True)]
            )
            if n > 0:  # the first block compiles the batched shapes and captures the pair's graphs
                batched_ms.append(t_batch)
                alone_ms.append(t_alone)
            for x, y in zip(together, alone, strict=True):
                errors.append(((x.float() - y.float()).norm() / y.float().norm()).item())
                worst = max(worst, (x.float() - y.float()).abs().max().item())
            for blk, v in zip(pair, alone, strict=True):
                blk.latents = stream.sampler.step(s, blk.latents, v)
        for st, blk in zip((a, b), pair, strict=True):
            stream.finish_block(st, blk)
    batched, interleaved = statistics.median(batched_ms), statistics.median(alone_ms)
    return {
        "size": f"{width}*{height}",
        "attention": attention,
        "cuda_graphs": stream.cuda_graphs,
        "pair_graphs": len(stream.batch_graphs),
        "interleaved_ms": round(interleaved, 2),
        "batched_ms": round(batched, 2),
        "batched_over_interleaved": round(batched / interleaved, 3),
        "rel_l2_max": float(f"{max(errors):.3g}"),
        "abs_max": float(f"{worst:.3g}"),
        "forwards_compared": len(errors),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }


async def live_pair(app: Any, seconds: float, tag: str) -> dict[str, Any]:
    """Two viewers at once on `app` for `seconds`: what each session generated and how much was batched."""
    import asyncio
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    url = app.url.replace("http", "ws") + "ws"
    folder = Path(tempfile.mkdtemp(prefix="batching_live_"))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(root / "bench" / "loopback_client.py"),
            "--url",
            url,
            "--seconds",
            str(seconds + 10),
            "--out",
            str(folder / f"client_{tag}_{i}.json"),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        for i in range(2)
    ]
    for proc in procs:  # each prints a line once its video flows
        assert proc.stdout is not None
        await proc.stdout.readline()
    sessions = list(app.registry)
    gset = app.sets.of(sessions[0].id)
    worker, generator = gset.worker, gset.generator
    blocks0 = [s.stream.blocks for s in sessions]
    batches0, batched0, t0 = worker.batches, worker.batched_blocks, time.monotonic()
    steps: dict[int, int] = {}
    while time.monotonic() - t0 < seconds:
        for s in sessions:
            steps[s.stream.sample_steps] = steps.get(s.stream.sample_steps, 0) + 1
        await asyncio.sleep(0.5)
    took = time.monotonic() - t0
    # how soon each session's next block followed its last one (the worker waits for a partner only when
    # this is under its batch_wait_s): the diagnosis when few blocks were batched
    gaps = {key: round(statistics.median(g) * 1e3, 1) for key, g in worker._gaps.items() if g}
    made = [s.stream.blocks - b for s, b in zip(sessions, blocks0, strict=True)]
    block_s = worker.load.block_seconds()
    result = {
        "batching": generator.max_batch > 1 and getattr(generator, "batch_off", None) is None,
        "generated_fps": [round(n * generator.frames_per_block / took, 2) for n in made],
        "blocks": made,
        "blocks_in_batches": worker.batched_blocks - batched0,
        "batches": worker.batches - batches0,
        "block_ms_per_session": round(block_s * 1e3, 1) if block_s else None,
        "resubmit_gap_ms": [gaps.get(s.id) for s in sessions],
        "batch_wait_ms": worker.batch_wait_s * 1e3,
        "steps_time_share": {k: round(v / max(1, sum(steps.values())), 2) for k, v in sorted(steps.items())},
    }
    for proc in procs:
        if proc.returncode is None:  # a viewer that failed has exited already
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        await proc.wait()
    while len(app.registry):
        await asyncio.sleep(0.1)
    return result


def measure_live(size: str, seconds: float) -> dict[str, Any]:
    """The live server with two sessions, batching on, then off (module docstring)."""
    import asyncio
    import gc
    import logging

    import torch

    from server.app import App
    from server.config import ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("websockets", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    async def run() -> dict[str, Any]:
        config = ServerConfig(
            host="127.0.0.1", port=0, backend="liveavatar", random_weights="14b", size=size, sample_steps=4,
            engine="compile", fp8=True, cuda_graphs=True, batch_sessions=True, realtime_capacity=0, max_sessions=2,
            log_level="info",
        ).validate()  # fmt: skip
        app = App(config)
        await app.start()
        try:
            generator = app.sets[0].generator
            result: dict[str, Any] = {"size": str(app.size), "batch_off_at_start": generator.batch_off}
            baseline = torch.cuda.memory_allocated() / 2**30
            result["on"] = await live_pair(app, seconds, "on")
            print(json.dumps(result), flush=True)
            generator.disable_batching("bench/batching.py --live: the run without batching")
            result["off"] = await live_pair(app, seconds, "off")
            gc.collect()
            await asyncio.sleep(1.0)
            after = torch.cuda.memory_allocated() / 2**30  # the sessions' rings, graphs and pair graphs freed?
            result["memory_gib"] = {"baseline": round(baseline, 2), "after_sessions_left": round(after, 2)}
            result["memory_back_to_baseline"] = abs(after - baseline) < 0.05
            return result
        finally:
            await app.stop()

    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", help="output size W*H (repeatable; default 384*256)")
    p.add_argument("--repeats", type=int, default=12, help="measured forwards per shape (default 12)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager launches instead of graph replays")
    p.add_argument("--real", action="store_true", help="the real batched forward of two sessions (docstring)")
    p.add_argument("--blocks", type=int, default=4, help="--real: blocks of both sessions (the first is warm-up)")
    p.add_argument("--tolerance", type=float, default=2e-2, help="--real: the largest relative L2 error that passes")
    p.add_argument("--arch", default="14b", choices=("14b", "tiny"), help="--real: model size (tiny: a CPU check)")
    p.add_argument("--live", action="store_true", help="two viewers on the live server, batching on then off")
    p.add_argument("--seconds", type=float, default=30.0, help="--live: streaming time of each run")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() and not (args.real and args.arch == "tiny"):
        raise SystemExit("bench/batching.py measures a GPU; no CUDA device is visible")
    if args.live:
        live = measure_live((args.size or ["384*256"])[0], args.seconds)
        live |= {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": source_commit()}
        live["device"] = torch.cuda.get_device_name(0)
        print(json.dumps(live, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(live, f, indent=1)
        return 0
    rows = []
    for size in args.size or ["384*256"]:
        if args.real:
            row = measure_real(size, args.blocks, not args.no_cuda_graphs, args.arch)
            row["pass"] = row["rel_l2_max"] <= args.tolerance
        else:
            row = measure(size, args.repeats, not args.no_cuda_graphs)
        print(json.dumps(row), flush=True)
        rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": source_commit(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda_graphs": not args.no_cuda_graphs,
        "mode": "real" if args.real else "premise",
        "rows": rows,
    }
    if args.real:
        print("| size | interleaved, 2 forwards (ms) | batched forward | batched / interleaved | rel. L2 max | same |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['size']} | {r['interleaved_ms']} | {r['batched_ms']} | {r['batched_over_interleaved']} | "
                f"{r['rel_l2_max']} | {'pass' if r['pass'] else 'FAIL'} |"
            )
    else:
        print(
            "| size | 1 block, 3 frames (ms) | interleaved, 2 x 3 frames | batched, 6 frames | batched / interleaved |"
        )
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['size']} | {r['forward_ms_3f']} | {r['interleaved_ms']} | {r['batched_ms']} | "
                f"{r['batched_over_interleaved']} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all(r.get("pass", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
