"""The LiveAvatar DiT (Wan2.2-S2V-14B made block-causal): one block of 3 latent frames per forward.

The module tree is the checkpoint (`blocks.N.self_attn.q`, `casual_audio_encoder.*`, ...), so loading
is `load_state_dict`. The model holds no per-session state: the streaming forward is handed the
session's condition cache and a ring object that stores the block's keys/values and returns the
window to attend to (see `liveavatar.streaming.dit`).

One forward can denoise the blocks of several sessions at once (`forward_segments`): their tokens
are a batch [S, L, C], so the per-token work (linears, FFN, the per-frame time modulation and audio
injection, the head) runs once over all of them, and what belongs to one session runs per `Segment`:
its self-attention (its own ring, condition K/V and RoPE positions) and its text context (the
cross-attention is batched over the segments, each row against its own prompt). The single-session
forward is that forward with one segment. A session's numbers do not depend on its batch: the few
operations that are not row-independent on every backend (the patch embedding's convolution, the
audio AdaIN's 3-row product) run per session, and FP8 linears scale each session on its own.

Numerics follow the original (docs/model.md §3, §11):
timestep embedding, modulation, residual stream and head in fp32; matmuls in the weight dtype (bf16 on
GPU, fp32 in CPU tests); LayerNorm statistics in fp32; RoPE in float64 with fp16-rounded factors; the
input of norm3 rounded to bf16 even in an fp32 run, as the original does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from engines.attention import attention
from liveavatar.models.attention import Attention
from liveavatar.models.audio_modules import AudioInjector, CausalAudioEncoder
from liveavatar.models.config import DiTConfig
from liveavatar.models.framepack import FramePackMotioner
from liveavatar.models.rope import apply_rope, block_positions, cond_positions, rope_factors

AUDIO_PAD_FRAMES = 73
"""Video frames of (replicated) audio prepended to each block's 12, as the original's motion_frames."""

ROLE_NOISY, ROLE_REF, ROLE_MOTION = 0, 1, 2
"""Rows of `trainable_cond_mask`."""

KV = tuple[torch.Tensor, torch.Tensor]


def frame_tokens(latent_h: int, latent_w: int) -> int:
    """Tokens of one latent frame after the 2×2 patch embedding."""
    return (latent_h // 2) * (latent_w // 2)


def cond_tokens(latent_h: int, latent_w: int) -> int:
    """Condition ("sink") tokens: the reference frame and FramePack's motion tokens (1x, 2x and 4x
    buckets: 1 + 1/4 + 1/4 frames), 2.5 frames' worth for latent sizes divisible by 8 (FramePack's)."""
    return 5 * frame_tokens(latent_h, latent_w) // 2


class AudioEmbedding(NamedTuple):
    """Per latent frame of a block: 5 audio tokens [F, 5, C] and the AdaIN vector [F, C]."""

    tokens: torch.Tensor
    global_emb: torch.Tensor


class RingKV(Protocol):
    """Where a streaming forward keeps its history: store the block's RoPE'd K/V of one layer and the
    condition K/V (keys roped at this forward's sink position), and return everything the block's
    queries attend to (condition + history + block)."""

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, cond_k: torch.Tensor, cond_v: torch.Tensor
    ) -> KV: ...


class Segment(NamedTuple):
    """What one session brings to a (batched) denoising forward besides its latents: everything that
    differs between sessions whose blocks share the forward."""

    context: torch.Tensor
    """Embedded text [1, text_len, C]."""
    audio: AudioEmbedding
    """Its block's audio, per latent frame ([F, 5, C], [F, C])."""
    factors: torch.Tensor
    """RoPE factors of its block's tokens (its frame position), complex [F*fsl, D/2]."""
    cond_factors: torch.Tensor
    """RoPE factors of its condition tokens, the reference at this forward's sink position."""
    cond_kv: list[KV]
    """Its un-roped condition K/V per layer."""
    ring: RingKV
    """Where its block's K/V go and what its queries attend to."""


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free LN in fp32, result in x's dtype (the original's WanLayerNorm)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _fp32_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), linear.weight.float(), linear.bias.float())


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [S, L, C] (fp32) with one (shift, scale) per group of S*L/G consecutive tokens ([G, C]): one
    group per latent frame, the frames of segment 0 first."""
    groups = shift.shape[0]
    xg = x.reshape(groups, -1, x.shape[-1])
    return (xg * (1 + scale[:, None]) + shift[:, None]).reshape(x.shape)


def _gate(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (y.float().reshape(gate.shape[0], -1, y.shape[-1]) * gate[:, None]).reshape(y.shape)


class DiTBlock(nn.Module):
    """One transformer block; self-attention goes through `attend` so the caller owns the KV cache."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.self_attn = Attention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, num_heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """x [S, L, C] in the compute dtype; e0 [G, 6, C] fp32 time projection per token group (latent
        frame); context [S, text_len, C], one prompt per segment; `attend(q, k, v)` is the
        self-attention (the caller owns RoPE and the KV cache)."""
        return self.post_attention(x, attend(*self.pre_attention(x, e0)), e0, context)

    def pre_attention(self, x: torch.Tensor, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block up to its self-attention: q, k, v [S, L, H, D] (qk-normed, not yet roped)."""
        shift1, scale1, _, _, _, _ = (self.modulation.float() + e0).unbind(1)
        n1 = _modulate(_layer_norm(x, self.eps).float(), shift1, scale1).to(x.dtype)
        return self.self_attn.qkv(n1)

    def post_attention(self, x: torch.Tensor, y: torch.Tensor, e0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The rest of the block from the self-attention's output y [S, L, H, D] (before its output
        projection): gated residual, text cross-attention (segment i against context[i]), FFN; result
        in x's dtype."""
        dtype = x.dtype
        _, _, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unbind(1)
        x = x.float() + _gate(self.self_attn.out(y), gate1)  # the residual stream stays fp32 inside the block
        # The original rounds norm3's input (and output) to bf16 even when it runs in fp32.
        u = F.layer_norm(
            x.to(torch.bfloat16).float(), x.shape[-1:], self.norm3.weight.float(), self.norm3.bias.float(), self.eps
        )
        u = u.to(torch.bfloat16).to(dtype)
        q, k, v = self.cross_attn.qkv(u, context)
        x = x + self.cross_attn.out(attention(q, k, v)).float()
        n2 = _modulate(F.layer_norm(x, x.shape[-1:], eps=self.eps), shift2, scale2).to(dtype)
        x = x + _gate(self.ffn(n2), gate2)
        return x.to(dtype)


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [S, F*fsl, C]; e [S*F, C] time embedding per frame (fp32) -> [S, F*fsl, out] in x's dtype."""
        shift, scale = (self.modulation.float() + e[:, None]).unbind(1)
        n = _modulate(_layer_norm(x, self.eps).float(), shift, scale)
        return _fp32_linear(self.head, n).to(x.dtype)


class LiveAvatarDiT(nn.Module):
    """Audio-driven causal DiT. Attribute names are the checkpoint's state-dict names.

    Choices where the original leaves room: text embedding and audio encoding are deterministic, so
    callers compute them once per prefill / block instead of once per forward (same values); only the
    pose-free path exists (cond_encoder contributes its bias); random init is PyTorch's default plus
    the original's randn/sqrt(dim) for modulations (`zero_init` is ignored: real weights override it).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        self.config = c
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(DiTBlock(c.dim, c.ffn_dim, c.num_heads, c.eps) for _ in range(c.num_layers))
        self.head = Head(c.dim, c.out_dim * 4, c.eps)
        self.cond_encoder = nn.Conv3d(c.cond_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(c.audio_dim, c.dim, c.num_audio_token, c.audio_layers)
        self.audio_injector = AudioInjector(c.dim, c.num_heads, c.audio_inject_layers, c.eps)
        self.trainable_cond_mask = nn.Embedding(3, c.dim)
        self.frame_packer = FramePackMotioner(c.dim, c.in_dim)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the matmuls: the dtype the weights were cast to."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # --- inputs -------------------------------------------------------------------------------------

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Unpadded T5 output [L, text_dim] -> [1, text_len, C]; padded rows stay unmasked, as upstream."""
        text_len = self.config.text_len
        if context.shape[0] > text_len:
            raise ValueError(f"text context has {context.shape[0]} tokens, more than text_len={text_len}")
        padded = context.new_zeros(text_len, context.shape[1])
        padded[: context.shape[0]] = context
        return self.text_embedding(padded.to(device=self.device, dtype=self.dtype)[None])

    def encode_audio(self, features: torch.Tensor) -> AudioEmbedding:
        """A block's wav2vec2 features [25, audio_dim, 4F] -> per-latent-frame audio embeddings (F frames).

        Like the original, the block's first audio frame is replicated 73 times in front (no real past
        audio), and only the last F outputs of the causal encoder are kept.
        """
        frames = features.shape[-1] // 4
        features = features.to(device=self.device, dtype=self.dtype)
        padded = torch.cat([features[..., :1].expand(-1, -1, AUDIO_PAD_FRAMES), features], dim=-1)
        global_emb, tokens = self.casual_audio_encoder(padded[None])
        return AudioEmbedding(tokens[0, -frames:].to(self.dtype), global_emb[0, -frames:, 0].to(self.dtype))

    def time_embeddings(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [N] -> (e [N, C], e0 [N, 6, C]), fp32 whatever the weight dtype."""
        half = self.config.freq_dim // 2
        freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
        sinusoid = torch.outer(t.to(torch.float64), freqs)
        s = torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float()
        e = _fp32_linear(self.time_embedding[2], F.silu(_fp32_linear(self.time_embedding[0], s)))
        e0 = _fp32_linear(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def _patchify(self, conv: nn.Conv3d, latents: torch.Tensor) -> torch.Tensor:
        """[16, F, h, w] (or a batch [S, 16, F, h, w]) -> tokens [S, F*(h/2)*(w/2), C] (S = 1 for one
        block; frame-major, row, column). A batch is patchified block by block: a convolution over a
        batch may take another algorithm than over one block (it does on the CPU), and a session's
        tokens must not depend on its batch."""
        x = latents.to(device=self.device, dtype=self.dtype)
        x = x if x.ndim == 5 else x[None]
        tokens = [conv(x[i : i + 1]).flatten(2).transpose(1, 2) for i in range(x.shape[0])]
        return tokens[0] if len(tokens) == 1 else torch.cat(tokens)

    def _unpatchify(self, out: torch.Tensor, frames: int, hp: int, wp: int) -> torch.Tensor:
        """Head output [S, F*hp*wp, 64] -> [S, 16, F, 2hp, 2wp]."""
        c = self.config.out_dim
        u = out.reshape(out.shape[0], frames, hp, wp, 2, 2, c)  # channel k = (q*2 + r)*16 + c
        return torch.einsum("sfhwqrc->scfhqwr", u).reshape(out.shape[0], c, frames, 2 * hp, 2 * wp)

    # --- forwards -----------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor, context: torch.Tensor) -> list[KV]:
        """Condition ("sink") forward over [reference ; FramePack motion] tokens at t = 0.

        Returns per layer the condition keys *before* RoPE and the values ([1, Lc, H, D]); the
        streaming forward re-ropes the keys with a shifted reference position every time. No audio,
        no head: the output itself is discarded, as in the original.
        """
        ref = self._patchify(self.patch_embedding, ref_latent)
        mot = self.frame_packer(motion_latents.to(device=self.device, dtype=self.dtype))
        roles = torch.tensor([ROLE_REF] * ref.shape[1] + [ROLE_MOTION] * mot.shape[1], device=self.device)
        x = torch.cat([ref, mot], dim=1) + self.trainable_cond_mask(roles).to(self.dtype)
        _, e0 = self.time_embeddings(torch.zeros(1, device=self.device))
        hp, wp = ref_latent.shape[-2] // 2, ref_latent.shape[-1] // 2
        factors = rope_factors(cond_positions(hp, wp).to(self.device), self.config.head_dim)
        cache: list[KV] = []

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.append((k, v))
            return attention(apply_rope(q, factors), apply_rope(k, factors), v)

        for block in self.blocks:
            x = block(x, e0, context, attend)
        return cache

    @torch.no_grad()
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        audio: AudioEmbedding,
        frame_start: int,
        cond_kv: list[KV],
        ref_frame: int,
        ring: RingKV,
        layers: tuple[int, int] | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoising forward of a block: noisy latents [16, F, h, w] -> flow velocity [16, F, h, w].

        `frame_start` is the block's absolute latent frame (RoPE time of its tokens); `ref_frame` the
        time position the reference keys get in this forward (the rolling sink, docs/model.md §3.5).
        `layers`/`hidden`: only part of the forward (see `forward_with_rope`).
        """
        hp, wp = latents.shape[2] // 2, latents.shape[3] // 2
        factors, cond_factors = self.rope_tables(frame_start, latents.shape[1], hp, wp, ref_frame)
        t = torch.as_tensor(timestep, dtype=torch.float32, device=self.device).reshape(1)
        return self.forward_with_rope(latents, t, context, audio, factors, cond_factors, cond_kv, ring, layers, hidden)

    def rope_tables(
        self, frame_start: int, frames: int, hp: int, wp: int, ref_frame: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE factors of the block's tokens and of the condition tokens (reference at `ref_frame`)."""
        head_dim = self.config.head_dim
        factors = rope_factors(block_positions(frame_start, frames, hp, wp).to(self.device), head_dim)
        cond_factors = rope_factors(cond_positions(hp, wp, ref_frame).to(self.device), head_dim)
        return factors, cond_factors

    @torch.no_grad()
    def forward_with_rope(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        audio: AudioEmbedding,
        factors: torch.Tensor,
        cond_factors: torch.Tensor,
        cond_kv: list[KV],
        ring: RingKV,
        layers: tuple[int, int] | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` with the timestep [1] and the RoPE tables already on the device: no host work and
        no Python value that changes from block to block, so a CUDA graph can capture it. The one-segment
        case of `forward_segments` (see there for `layers`/`hidden`)."""
        segment = Segment(context, audio, factors, cond_factors, cond_kv, ring)
        out = self.forward_segments(latents[None], t, [segment], layers, hidden)
        return out if layers is not None and layers[1] < len(self.blocks) else out[0]

    @torch.no_grad()
    def forward_segments(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        segments: Sequence[Segment],
        layers: tuple[int, int] | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoising forward of S sessions' blocks at one timestep: latents [S, 16, F, h, w] (the
        same F, h, w for all), t [1], one `Segment` per block -> velocities [S, 16, F, h, w].

        Every segment's result is what its block alone would give (module docstring): per-token work
        does not mix rows, the cross-attention takes row i against segment i's context, the audio
        injection is per latent frame, and the self-attention runs per segment on its own ring.

        `layers=(a, b)` runs blocks a..b-1 only (a pipeline that cuts a step between GPUs): from
        `hidden` [S, L, C], the token stream after block a-1, when a > 0; the result is the token
        stream after block b-1 unless b is the last layer, then the velocities as usual."""
        count, frames = len(segments), latents.shape[2]
        hp, wp = latents.shape[3] // 2, latents.shape[4] // 2
        if latents.shape[0] != count:
            raise ValueError(f"{latents.shape[0]} blocks of latents for {count} segments")
        first, last = layers or (0, len(self.blocks))
        if first == 0:
            x = self.embed_noisy(latents)
        elif hidden is None:
            raise ValueError(f"layers start at {first}: the token stream after block {first - 1} is needed")
        else:
            x = hidden
        e, e0 = self.time_embeddings(t)
        e, e0 = e.expand(count * frames, -1), e0.expand(count * frames, -1, -1)
        if count == 1:
            context, audio = segments[0].context, segments[0].audio
        else:
            context = torch.cat([seg.context for seg in segments])
            audio = AudioEmbedding(
                torch.cat([seg.audio.tokens for seg in segments]), torch.cat([seg.audio.global_emb for seg in segments])
            )

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs = []
            for i, seg in enumerate(segments):
                qi, ki, vi = (q, k, v) if count == 1 else (q[i : i + 1], k[i : i + 1], v[i : i + 1])
                cond_k, cond_v = seg.cond_kv[layer]
                ki, cond_k = apply_rope(ki, seg.factors), apply_rope(cond_k, seg.cond_factors)
                keys, values = seg.ring.update(layer, ki, vi, cond_k, cond_v)
                outs.append(attention(apply_rope(qi, seg.factors), keys, values))
            return outs[0] if count == 1 else torch.cat(outs)

        x = self.run_layers(x, e0, context, audio, attend, first, last)
        if last < len(self.blocks):
            return x
        return self.velocities(x, e, frames, hp, wp)

    def embed_noisy(self, latents: torch.Tensor) -> torch.Tensor:
        """Noisy latents [16, F, h, w] (or a batch [S, 16, F, h, w]) -> tokens [S, F*fsl, C]."""
        x = self._patchify(self.patch_embedding, latents)
        # No pose video: cond_encoder sees zeros, so only its bias reaches the tokens.
        return x + self.cond_encoder.bias + self.trainable_cond_mask.weight[ROLE_NOISY].to(self.dtype)

    def run_layers(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        audio: AudioEmbedding,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        first: int = 0,
        last: int | None = None,
    ) -> torch.Tensor:
        """Blocks first..last-1 (all by default) over x [S, L, C], each followed by its audio injection if
        it has one. `attend(layer, q, k, v)` is that layer's self-attention: the caller owns RoPE and the
        KV cache."""
        injector = self.audio_injector
        for layer in range(first, len(self.blocks) if last is None else last):
            x = self.blocks[layer](x, e0, context, functools.partial(attend, layer))
            if layer in injector.layer_to_index:
                x = injector(injector.layer_to_index[layer], x, audio.tokens, audio.global_emb)
        return x

    def velocities(self, x: torch.Tensor, e: torch.Tensor, frames: int, hp: int, wp: int) -> torch.Tensor:
        """Token streams after the last block [S, F*hp*wp, C] -> flow velocities [S, 16, F, 2hp, 2wp]."""
        return self._unpatchify(self.head(x, e), frames, hp, wp)

    def velocity(self, x: torch.Tensor, e: torch.Tensor, frames: int, hp: int, wp: int) -> torch.Tensor:
        """One block's token stream [1, F*hp*wp, C] -> its flow velocity [16, F, 2hp, 2wp]."""
        return self.velocities(x, e, frames, hp, wp)[0]
