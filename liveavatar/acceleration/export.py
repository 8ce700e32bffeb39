"""Functional, export-ready forms of the two per-block steps: one DiT denoising forward and one VAE
latent-frame decode, with every cache as an explicit input and output.

ONNX graphs and TensorRT engines hold no state, so the caches the PyTorch modules keep in session
objects (the KV ring, the decoder's causal-conv cache) become tensors that go in and come back out.
Both forms cover the steady state of a stream (ring full, decoder past its first chunks): the shapes
that repeat for every block. RoPE takes precomputed cos/sin tables in float32 (TensorRT has no
float64); against the float64 original that changes the outputs by rounding only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from engines.attention import attention
from engines.cli import ExportTarget
from liveavatar.models.config import DiTConfig, output_size
from liveavatar.models.rope import block_positions, cond_positions, rope_factors, rotate
from liveavatar.models.transformer_liveavatar import AudioEmbedding, LiveAvatarDiT, cond_tokens, frame_tokens
from liveavatar.models.vae import StreamingDecoder, VAEConfig, WanVAE, build_vae


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin [L, head_dim/2] with the original's fp16-rounded factors."""
    f = rope_factors(positions, head_dim)
    return f.real.float().contiguous(), f.imag.float().contiguous()


class DiTBlockStep(nn.Module):
    """One denoising forward of a block with the step's KV ring and the sink cache as tensors.

    Inputs: latents [16, 3, h, w], timestep [1], text context [1, text_len, C] (embedded), audio
    tokens [3, 5, C] and AdaIN vectors [3, C], RoPE cos/sin of the block [3·fsl, D/2] and of the sink
    keys [Lc, D/2], ring K/V [layers, 1, 12·fsl, H, D], un-roped sink K and V [layers, 1, Lc, H, D],
    and the ring token slots the block writes [3·fsl] (int64).
    Outputs: velocity [16, 3, h, w] and the updated ring K/V.
    """

    def __init__(self, dit: LiveAvatarDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(
        self,
        latents,
        timestep,
        context,
        audio_tokens,
        audio_global,
        cos,
        sin,
        cond_cos,
        cond_sin,
        ring_k,
        ring_v,
        cond_k,
        cond_v,
        slots,
    ):
        dit = self.dit
        frames, hp, wp = latents.shape[1], latents.shape[2] // 2, latents.shape[3] // 2
        x = dit.embed_noisy(latents)
        e, e0 = dit.time_embeddings(timestep.reshape(1))
        e, e0 = e.expand(frames, -1), e0.expand(frames, -1, -1)
        table, cond_table = torch.stack([cos, sin], dim=-1), torch.stack([cond_cos, cond_sin], dim=-1)
        new_k, new_v = [], []

        def attend(layer, q, k, v):
            rk = ring_k[layer].index_copy(1, slots, rotate(k, table, "real"))
            rv = ring_v[layer].index_copy(1, slots, v)
            new_k.append(rk)
            new_v.append(rv)
            keys = torch.cat([rk, rotate(cond_k[layer], cond_table, "real")], dim=1)
            return attention(rotate(q, table, "real"), keys, torch.cat([rv, cond_v[layer]], dim=1))

        x = dit.run_layers(x, e0, context, AudioEmbedding(audio_tokens, audio_global), attend)
        return dit.velocity(x, e, frames, hp, wp), torch.stack(new_k), torch.stack(new_v)


def dit_step_inputs(
    dit: LiveAvatarDiT, latent_h: int, latent_w: int, frame_start: int = 24, ref_frame: int = 40, seed: int = 0
) -> tuple:
    """Random steady-state inputs for `DiTBlockStep` (frame_start ≥ 12: the ring is full)."""
    c, dev, dtype = dit.config, dit.device, dit.dtype
    g = torch.Generator().manual_seed(seed)
    hp, wp = latent_h // 2, latent_w // 2
    fsl, lc = frame_tokens(latent_h, latent_w), cond_tokens(latent_h, latent_w)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    cos, sin = rope_tables(block_positions(frame_start, 3, hp, wp), c.head_dim)
    cond_cos, cond_sin = rope_tables(cond_positions(hp, wp, ref_frame), c.head_dim)
    start = (frame_start % 12) * fsl
    return (
        rnd(16, 3, latent_h, latent_w),
        torch.tensor([857.6923], device=dev),
        rnd(1, c.text_len, c.dim),
        rnd(3, 5, c.dim),
        rnd(3, c.dim),
        cos.to(dev),
        sin.to(dev),
        cond_cos.to(dev),
        cond_sin.to(dev),
        rnd(c.num_layers, 1, 12 * fsl, c.num_heads, c.head_dim),
        rnd(c.num_layers, 1, 12 * fsl, c.num_heads, c.head_dim),
        rnd(c.num_layers, 1, lc, c.num_heads, c.head_dim),
        rnd(c.num_layers, 1, lc, c.num_heads, c.head_dim),
        torch.arange(start, start + 3 * fsl, device=dev),
    )


DIT_INPUT_NAMES = [
    "latents",
    "timestep",
    "context",
    "audio_tokens",
    "audio_global",
    "cos",
    "sin",
    "cond_cos",
    "cond_sin",
    "ring_k",
    "ring_v",
    "cond_k",
    "cond_v",
    "slots",
]
DIT_OUTPUT_NAMES = ["velocity", "ring_k_out", "ring_v_out"]


class VAEDecodeStep(nn.Module):
    """Decode one latent frame [16, 1, h, w] → 4 frames [3, 4, 8h, 8w], causal-conv caches explicit.

    `layout` marks which cache slots hold tensors in the steady state (the rest stay None).
    """

    def __init__(self, vae: WanVAE, layout: list[bool]) -> None:
        super().__init__()
        self.vae, self.model, self.layout = vae, vae.model, layout

    def forward(self, latent: torch.Tensor, *caches: torch.Tensor):
        it = iter(caches)
        cache = [next(it) if present else None for present in self.layout]
        x = self.model.post_quant_conv(self.vae.denormalize(latent).unsqueeze(0))
        out = self.model.decoder(x, cache, [0], first_chunk=False)[0].clamp(-1.0, 1.0)
        return (out, *[t for t in cache if t is not None])


def vae_step_inputs(decoder: StreamingDecoder, latent_h: int, latent_w: int, seed: int = 0) -> tuple[list[bool], tuple]:
    """Warm a decoder stream up (as the streaming decoder does) and return its cache as inputs."""
    g = torch.Generator().manual_seed(seed)
    vae = decoder.vae
    state = decoder.new_state(torch.randn(16, 7, latent_h, latent_w, generator=g).to(vae.device, vae.dtype))
    layout = [isinstance(t, torch.Tensor) for t in state.feat_cache]
    latent = torch.randn(16, 1, latent_h, latent_w, generator=g).to(vae.device, vae.dtype)
    return layout, (latent, *[t.clone() for t in state.feat_cache if isinstance(t, torch.Tensor)])


def export_targets(arch: str = "tiny", size: str = "704*384", device: str = "cpu") -> list[ExportTarget]:
    """What `liveavatar engines build` exports: the DiT block step and the VAE decode step."""
    width, height = output_size(size)
    lh, lw = height // 8, width // 8
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        dit = LiveAvatarDiT(DiTConfig.full_14b() if arch == "14b" else DiTConfig.tiny()).to(dtype).eval()
    decoder = StreamingDecoder(
        WanVAE(build_vae(VAEConfig.wan21() if arch == "14b" else VAEConfig.tiny(), device=device).to(dtype))
    )
    layout, vae_inputs = vae_step_inputs(decoder, lh, lw)
    n_cache = len(vae_inputs) - 1
    return [
        ExportTarget(
            "dit_block_step", DiTBlockStep(dit), dit_step_inputs(dit, lh, lw), DIT_INPUT_NAMES, DIT_OUTPUT_NAMES
        ),
        ExportTarget(
            "vae_decode_step",
            VAEDecodeStep(decoder.vae, layout),
            vae_inputs,
            ["latent"] + [f"cache_{i}" for i in range(n_cache)],
            ["frames"] + [f"cache_out_{i}" for i in range(n_cache)],
        ),
    ]
