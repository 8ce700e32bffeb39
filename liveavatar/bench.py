"""`liveavatar bench`: stream a fixed number of blocks and report speed per stage, on 1 or N GPUs.

One code path for every GPU count: the timestep-forcing pipeline (`engines.tpp`) with N ranks, which
for N = 1 is the plain sequential loop. Weights are random unless `--ckpt-dir` is given: speed does
not depend on their values, and random weights let the full 14B architecture be measured anywhere.
Steady-state numbers skip the warm-up blocks (compilation, the first clip's partly filled KV rings and
the adaptive-sink prefill at block 4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from liveavatar.settings import ModelSettings, SettingsError, add_model_arguments, validate
from liveavatar.version import source_commit

RESULTS_DIR = Path("bench/results")
VIDEO_FRAMES_PER_BLOCK = 12
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # tiny: a smoke test of the whole pipeline, seconds on a CPU (size: liveavatar.settings, 128*128)
    "tiny": {"blocks": 6, "warmup": 2},
    # 14b: steady state from block 8 (kept since 2026-11-21 so results compare; the compiled VAE used to
    # recompile up to block 7, and settles while the session opens since the decoder's strides are canonical)
    "14b": {"blocks": 16, "warmup": 8},
}


def _per_arch(key: str) -> str:
    return ", ".join(f"{arch} {values[key]}" for arch, values in ARCH_DEFAULTS.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    # --random-weights (bench's own spelling: --arch) is the architecture, random unless --ckpt-dir
    add_model_arguments(p, "bench", random_weights="tiny")
    p.add_argument(
        "--blocks",
        type=int,
        default=None,
        help=f"blocks to stream in total (default per --arch: {_per_arch('blocks')})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"first blocks left out of the steady-state numbers (default per --arch: {_per_arch('warmup')})",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    p.add_argument("--compile-rope", action="store_true", help="with --engine compile: fused real-arithmetic RoPE")
    p.add_argument("--compile-vae", action="store_true", help="torch.compile the VAE decoder")
    p.add_argument("--cuda-graphs", action="store_true", help="replay steady-state DiT forwards from CUDA graphs")
    p.add_argument("--attention", default="auto", help="auto (fastest exact), sdpa, cudnn, flash, efficient, fa3")
    p.add_argument("--gpus", type=int, default=1, help="ranks of the timestep-forcing pipeline")
    p.add_argument("--decode-rank", action="store_true", help="decode on a rank of its own (N-1 denoising ranks)")
    p.add_argument(
        "--balance",
        action="store_true",
        help="cut steps between ranks at layer boundaries so every rank has the same work, decode included",
    )
    p.add_argument(
        "--decode-cost",
        type=float,
        default=0.65,
        help="with --balance: VAE time per block in units of one DiT step (0.65 = 120 / 182 ms, H200 FP8)",
    )
    p.add_argument("--no-vae", action="store_true", help="skip the VAE decode (DiT only)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--json",
        nargs="?",
        const="auto",
        default=None,
        help="write the result as JSON (default path under bench/results/)",
    )


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as plain data, checked as every command checks them (SettingsError), with the size,
    block count and warm-up of the architecture where none was given."""
    model = validate(ModelSettings.from_args(args))
    opts = vars(args).copy()
    opts.pop("_module", None)
    opts.update(
        arch=model.random_weights,
        size=model.size,
        steps=model.sample_steps,
        engine=model.engine,
        fp8=model.fp8,
        ckpt_dir=model.ckpt_dir or None,
    )
    for key, value in ARCH_DEFAULTS[opts["arch"]].items():
        if opts[key] is None:
            opts[key] = value
    return opts


def run(args: argparse.Namespace) -> int:
    import torch

    from engines.distributed import default_backend, spawn

    try:
        opts = resolve_options(args)
    except SettingsError as exc:
        print(f"liveavatar bench: {exc}", file=sys.stderr)
        return 2
    opts["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if opts["device"] == "cuda" and args.gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus} but only {torch.cuda.device_count()} CUDA devices are visible")
    if opts["blocks"] <= opts["warmup"]:
        raise SystemExit(f"--blocks ({opts['blocks']}) must be larger than --warmup ({opts['warmup']})")
    if args.gpus == 1:
        reports = [bench_rank(0, 1, opts)]
    else:
        backend = "nccl" if opts["device"] == "cuda" else default_backend()
        reports = spawn(args.gpus, bench_rank, args=(opts,), backend=backend)
    result = summarize(reports, opts)
    print(format_table(result))
    if args.json:
        path = Path(args.json) if args.json != "auto" else RESULTS_DIR / _result_name(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


def bench_rank(rank: int, world_size: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Build what this rank needs, stream the blocks, return its timings (plain data)."""
    import torch

    from engines.tpp import PipelinePlan, run_rank
    from liveavatar.acceleration.accelerate import StreamStages, sink_feedback
    from liveavatar.models.config import output_size

    cuda = opts["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # the compute stream only: a device-wide sync would also wait for a pending NCCL send to be received
    sync = (lambda: torch.cuda.current_stream(device).synchronize()) if cuda else (lambda: None)
    width, height = output_size(opts["size"])
    lh, lw = height // 8, width // 8
    cfg = _config(opts)
    balance = bool(opts.get("balance"))
    plan = PipelinePlan(
        opts["steps"],
        world_size,
        decode_rank=opts["decode_rank"],
        decode_cost=opts["decode_cost"] if balance and not opts["no_vae"] else 0.0,
        parts=cfg.num_layers if balance else 1,
    )
    stream, attention = build_stream(opts, device, lh, lw) if plan.steps_of(rank) else (None, None)
    decoder = None if opts["no_vae"] or rank != plan.decoder else build_decoder(opts, device)
    inputs = make_inputs(cfg, device, lh, lw)
    stages = StreamStages(stream, inputs, decoder, sync=sync)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.cuda.reset_peak_memory_stats(device) if cuda else None
    hidden = (1, 3 * (lh // 2) * (lw // 2), cfg.dim)
    report = run_rank(
        plan, rank, stages, opts["blocks"], (16, 3, lh, lw), dtype, device, sink_feedback(lh, lw, dtype), sync, hidden
    )
    return {
        "rank": rank,
        "steps": report.steps,
        "spans": [(sp.step, sp.start, sp.end) for sp in plan.spans_of(rank)],
        "step_ms": report.step_ms,
        "decode_ms": report.decode_ms,
        "audio_ms": stages.audio_ms,
        "started_at": report.started_at,
        "decoded_at": report.decoded_at,
        "wait_ms": report.wait_ms,
        "attention": attention,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
    }


def _config(opts: dict[str, Any]):
    from liveavatar.models.config import DiTConfig

    if opts["ckpt_dir"]:
        return DiTConfig.from_json(Path(opts["ckpt_dir"]) / "config.json")
    return DiTConfig.full_14b() if opts["arch"] == "14b" else DiTConfig.tiny()


def build_stream(opts: dict[str, Any], device, latent_h: int, latent_w: int):
    """The DiT with the chosen accelerations, wrapped for streaming; returns (stream, attention name)."""
    import torch

    from liveavatar.acceleration.accelerate import apply_fp8, choose_attention, compile_dit, compile_rope
    from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
    from liveavatar.streaming.dit import StreamingDiT

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if opts["ckpt_dir"]:
        from liveavatar.models.loading import load_dit

        dit = load_dit(opts["ckpt_dir"], device=device, dtype=dtype, progress=False)
    else:
        cfg = _config(opts)
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise 16 B parameters directly in bf16 on the GPU
        try:
            with device:
                dit = LiveAvatarDiT(cfg)
        finally:
            torch.set_default_dtype(previous)
        dit = dit.eval().requires_grad_(False)
    if opts["fp8"]:
        apply_fp8(dit)
    if opts["engine"] == "compile":
        from engines.cache import DEFAULT_ROOT
        from engines.compile import persistent_compile_cache

        persistent_compile_cache(DEFAULT_ROOT, device)
        compile_dit(dit, backend=opts["compile_backend"])
        if opts.get("compile_rope"):
            compile_rope(backend=opts["compile_backend"])
    if opts["attention"] == "auto":
        attention = choose_attention(dit, latent_h, latent_w)
    else:
        from engines.attention import set_backend

        attention = set_backend(opts["attention"]).name
    return StreamingDiT(dit, opts["steps"], cuda_graphs=bool(opts.get("cuda_graphs"))), attention


def build_decoder(opts: dict[str, Any], device):
    import torch

    from liveavatar.models.vae import StreamingDecoder, VAEConfig, WanVAE, build_vae

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if opts["ckpt_dir"]:
        from liveavatar.models.loading import load_vae

        return StreamingDecoder(load_vae(Path(opts["ckpt_dir"]) / "Wan2.1_VAE.pth", device=device, dtype=dtype))
    torch.manual_seed(1)
    config = VAEConfig.wan21() if opts["arch"] == "14b" else VAEConfig.tiny()
    decoder = StreamingDecoder(WanVAE(build_vae(config, device=device).to(dtype)))
    if opts.get("compile_vae"):
        from liveavatar.acceleration.accelerate import compile_vae

        compile_vae(decoder, backend=opts["compile_backend"])
    return decoder


def make_inputs(cfg, device, latent_h: int, latent_w: int):
    """Fixed random conditioning for a DiT of config `cfg`, identical on every rank (same seeds)."""
    import torch

    from liveavatar.acceleration.accelerate import BlockInputs

    g = torch.Generator().manual_seed(1234)
    return BlockInputs(
        ref_latent=torch.randn(16, 1, latent_h, latent_w, generator=g).to(device),
        motion_latents=torch.randn(16, 19, latent_h, latent_w, generator=g).to(device),
        text_context=torch.randn(64, cfg.text_dim, generator=g).to(device),
        audio_feats=[torch.randn(cfg.audio_layers, cfg.audio_dim, 12, generator=g).to(device) for _ in range(4)],
        seed=420,
    )


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summarize(reports: list[dict[str, Any]], opts: dict[str, Any]) -> dict[str, Any]:
    """Steady-state numbers over the blocks after the warm-up."""
    warm = opts["warmup"]
    first, last = reports[0], reports[-1]
    decoded, started = last["decoded_at"], first["started_at"]
    intervals = [b - a for a, b in zip(decoded[warm - 1 : -1], decoded[warm:], strict=True)]
    block_s = statistics.median(intervals)
    step_ms: dict[int, float] = {}
    for rep in reports:  # a step cut between ranks is the sum of its parts
        for step, values in rep["step_ms"].items():
            step_ms[int(step)] = round(step_ms.get(int(step), 0.0) + (_median(values[warm:]) or 0.0), 2)
    latency = [d - s for s, d in zip(started[warm:], decoded[warm:], strict=True)]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": source_commit(),
        "arch": opts["arch"],
        "size": opts["size"],
        "steps": opts["steps"],
        "gpus": len(reports),
        "decode_rank": opts["decode_rank"],
        "balanced": bool(opts.get("balance")),
        "spans_per_rank": [r.get("spans") for r in reports],
        "engine": opts["engine"],
        "fp8": opts["fp8"],
        "extras": "".join(
            f" +{k.replace('_', '-')}" for k in ("compile_rope", "compile_vae", "cuda_graphs", "balance") if opts.get(k)
        ),
        "attention": first["attention"] or next((r["attention"] for r in reports if r["attention"]), None),
        "gpu": first["gpu"],
        "blocks": opts["blocks"],
        "warmup_blocks": warm,
        "steady_fps": round(VIDEO_FRAMES_PER_BLOCK / block_s, 2),
        "block_interval_ms": round(block_s * 1e3, 1),
        # with the input paced by real audio no queue forms: a block's latency is its stages in a row
        "stage_latency_ms": round(
            sum(v for v in step_ms.values() if v)
            + (_median(last["decode_ms"][warm:]) or 0)
            + (_median(first["audio_ms"][warm:]) or 0),
            1,
        ),
        # measured with the first rank running flat out: includes blocks queued before the slowest rank
        "block_latency_ms": round(statistics.median(latency) * 1e3, 1),
        "first_block_cold_ms": round((decoded[0] - started[0]) * 1e3, 1),
        "audio_encoder_ms": _median(first["audio_ms"][warm:]),
        "dit_step_ms": step_ms,
        "dit_ms_per_block": round(sum(v for v in step_ms.values() if v), 1),
        "vae_ms": _median(last["decode_ms"][warm:]),
        "peak_gib_per_rank": [round(r["peak_gib"], 1) if r["peak_gib"] is not None else None for r in reports],
    }


def format_table(r: dict[str, Any]) -> str:
    steps = " / ".join(f"{r['dit_step_ms'][s]:.1f}" for s in sorted(r["dit_step_ms"]))
    rows = [
        (
            "model",
            f"{r['arch']} @ {r['size']}, {r['steps']} steps, {r['gpus']} GPU(s)"
            + (" + decode rank" if r["decode_rank"] else ""),
        ),
        ("engine", f"{r['engine']}{r['extras']}, fp8 {'on' if r['fp8'] else 'off'}, attention {r['attention']}"),
        ("GPU / commit / date", f"{r['gpu']} / {r['commit']} / {r['date']}"),
        ("steady fps", f"{r['steady_fps']} ({r['block_interval_ms']} ms per 12-frame block)"),
        (
            "block latency (audio ready → frames decoded)",
            f"{r['stage_latency_ms']} ms paced; {r['block_latency_ms']} ms saturated"
            f" (cold first block {r['first_block_cold_ms']} ms)",
        ),
        ("audio encoder ms", f"{r['audio_encoder_ms']}"),
        ("DiT ms per step", f"{steps} (sum {r['dit_ms_per_block']})"),
        ("VAE ms per block", f"{r['vae_ms']}"),
        ("peak GiB per rank", ", ".join(str(v) for v in r["peak_gib_per_rank"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)


def _result_name(r: dict[str, Any]) -> str:
    stamp = r["date"].replace(" ", "_").replace(":", "")
    extras = r["extras"].replace(" +", "_")
    return f"{stamp}_{r['arch']}_{r['gpus']}gpu_{r['engine']}{'_fp8' if r['fp8'] else ''}{extras}.json"
