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
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", help="output size W*H (repeatable; default 384*256)")
    p.add_argument("--repeats", type=int, default=12, help="measured forwards per shape (default 12)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager launches instead of graph replays")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/batching.py measures a GPU; no CUDA device is visible")
    rows = []
    for size in args.size or ["384*256"]:
        row = measure(size, args.repeats, not args.no_cuda_graphs)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": source_commit(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda_graphs": not args.no_cuda_graphs,
        "rows": rows,
    }
    print("| size | 1 block, 3 frames (ms) | interleaved, 2 x 3 frames | batched, 6 frames | batched / interleaved |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['size']} | {r['forward_ms_3f']} | {r['interleaved_ms']} | {r['batched_ms']} | "
            f"{r['batched_over_interleaved']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
