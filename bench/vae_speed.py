"""Wan2.1 VAE streaming decode speed at 704×384 (random bf16 weights): ms per 12-frame block for
latents decoded one per call vs a block per call, cuDNN autotuning off/on, NCDHW vs channels-last,
eager (all variants in one run) or compiled (one variant per run). Prints one JSON line per variant.
Usage: python3 bench/vae_speed.py [--compile [--channels-last]]"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch._dynamo

from liveavatar.models.vae import StreamingDecoder, VAEConfig, WanVAE, build_vae


def measure(decoder: StreamingDecoder, blocks: int, warm: int, lh: int, lw: int) -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    motion = torch.randn(16, 7, lh, lw, device="cuda", dtype=torch.bfloat16, generator=g)
    state = decoder.new_state(motion)
    times = []
    for _ in range(blocks):
        x = torch.randn(16, 3, lh, lw, device="cuda", dtype=torch.bfloat16, generator=g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = decoder.decode(state, x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        assert out.shape[1] == 12
    steady = sorted(times[warm:])
    return steady[len(steady) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="with --compile: channels-last weights")
    p.add_argument("--blocks", type=int, default=None, help="default 8 eager, 16 compiled")
    args = p.parse_args()
    torch.manual_seed(1)
    base = build_vae(VAEConfig.wan21(), device="cuda").to(torch.bfloat16)
    variants = [(1, False, False), (3, False, False), (3, True, False), (3, True, True), (1, True, True)]
    if args.compile:
        torch._dynamo.config.recompile_limit = 64
        variants = [(3, True, args.channels_last)]
    for chunk, bench, cl in variants:
        torch.backends.cudnn.benchmark = bench
        model = base.to(memory_format=torch.channels_last_3d) if cl else base.to(memory_format=torch.contiguous_format)
        vae = WanVAE(model, decode_chunk=chunk)
        if args.compile:
            model.decoder.compile(dynamic=False)
        t0 = time.perf_counter()
        # compiled: the first 8 blocks still recompile for new cache strides (seen on an H200)
        blocks, warm = (args.blocks or 16, 8) if args.compile else (args.blocks or 8, 3)
        ms = measure(StreamingDecoder(vae), blocks, warm, 48, 88)
        print(
            json.dumps(
                {
                    "chunk": chunk,
                    "cudnn_benchmark": bench,
                    "channels_last_3d": cl,
                    "compiled": args.compile,
                    "vae_ms_per_block": round(ms, 1),
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "gpu": torch.cuda.get_device_name(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
