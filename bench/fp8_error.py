"""FP8 error against bf16 on the same random weights and inputs: one linear and one whole block.

Run on a GPU it measures the real `torch._scaled_mm` path; on the CPU the fp32 emulation. Prints
relative errors ‖a − b‖ / ‖b‖ against a float64 (linear) or bf16 (block) reference, as JSON.

    python bench/fp8_error.py --arch tiny            # CPU, seconds
    python bench/fp8_error.py --arch 14b --size 704*384   # GPU
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn

from engines.fp8 import FP8Linear
from liveavatar.acceleration.accelerate import apply_fp8
from liveavatar.models.config import DiTConfig, output_size
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.streaming.dit import StreamingDiT


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def linear_errors(device: torch.device, tokens: int, dim: int, ffn: int) -> dict:
    """bf16 and FP8 against float64 for the two shapes that dominate a block (q/k/v/o and ffn.0)."""
    out = {}
    for name, (n_in, n_out) in {"attn_proj": (dim, dim), "ffn_0": (dim, ffn)}.items():
        torch.manual_seed(0)
        lin = nn.Linear(n_in, n_out).to(device, torch.bfloat16)
        x = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16)
        exact = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        fp8 = FP8Linear(lin)
        out[name] = {
            "bf16": rel(lin(x), exact),
            "fp8": rel(fp8(x), exact),
            "fp8_path": "emulated" if fp8.emulate else "scaled_mm",
        }
    return out


def block_errors(device: torch.device, arch: str, size: str) -> dict:
    """Final latents and step-0 velocity of one streamed block, FP8 vs bf16, same weights and noise."""
    dtype = torch.bfloat16
    cfg = DiTConfig.full_14b() if arch == "14b" else DiTConfig.tiny()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        dit = LiveAvatarDiT(cfg).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    w, h = output_size(size)
    g = torch.Generator().manual_seed(1)
    ref, motion = torch.randn(16, 1, h // 8, w // 8, generator=g), torch.randn(16, 19, h // 8, w // 8, generator=g)
    text, audio = torch.randn(64, cfg.text_dim, generator=g), torch.randn(25, cfg.audio_dim, 12, generator=g)
    noise = torch.randn(16, 3, h // 8, w // 8, generator=g)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        stream = StreamingDiT(dit, 4)
        state = stream.new_state(ref, motion, text, seed=0)
        state.sink_shift_draws = iter([10] * 4)
        velocities = []
        x = stream.step(state, audio.to(device), noise=noise, observer=lambda s, x, v: velocities.append(v.clone()))
        return x, velocities[0]

    x_bf16, v_bf16 = run()
    converted = apply_fp8(dit)
    x_fp8, v_fp8 = run()
    return {
        "linears_converted": len(converted),
        "velocity_step0": rel(v_fp8, v_bf16),
        "latents_after_4_steps": rel(x_fp8, x_bf16),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=("tiny", "14b"), default="tiny")
    p.add_argument("--size", default="128*128")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DiTConfig.full_14b()
    tokens = 3168 if device.type == "cuda" else 256
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "linear_vs_float64": linear_errors(device, tokens, cfg.dim, cfg.ffn_dim)
        if device.type == "cuda"
        else linear_errors(device, tokens, 512, 1024),
        "block_fp8_vs_bf16": block_errors(device, args.arch, args.size),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
