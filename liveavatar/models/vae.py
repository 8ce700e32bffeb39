"""Wan2.1 VAE (diffusers' `AutoencoderKLWan`) with per-session causal streaming decode.

The module weights are shared by every session; the per-session part of streaming decode is the
causal-conv feature cache (the last two input frames of every temporal conv). diffusers keeps that
cache on the model (`_feat_map`), which would let interleaved sessions corrupt each other, so this
file never calls `AutoencoderKLWan.encode/decode`: it drives `vae.encoder` / `vae.decoder` directly and
passes an explicit cache list that lives in a `VAEStreamState` (decode) or in a local (encode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

# Per-channel latent statistics of the Wan2.1 VAE (docs/model.md §7.1); latents are normalised with them.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    """Constructor arguments of `AutoencoderKLWan`; strides stay (4, 8, 8) for every config."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    @classmethod
    def wan21(cls) -> VAEConfig:
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """The Wan2.1 topology at 1/12 of the width (latent channels stay 16 for the DiT).

        Only the width changes: diffusers' converter hard-codes the Wan2.1 layout (which blocks have
        shortcuts, index of every upsampler), so the tiny model keeps the original state-dict names.
        """
        return cls(base_dim=8)


def build_vae(config: VAEConfig, device: torch.device | str = "cpu") -> AutoencoderKLWan:
    """Build the diffusers module; on `meta` it costs nothing and is filled by `load_state_dict(assign=True)`."""
    with torch.device(device):
        vae = AutoencoderKLWan(
            base_dim=config.base_dim,
            z_dim=config.z_dim,
            dim_mult=list(config.dim_mult),
            num_res_blocks=config.num_res_blocks,
            attn_scales=[],
            temperal_downsample=list(config.temperal_downsample),
            latents_mean=list(WAN21_LATENTS_MEAN),
            latents_std=list(WAN21_LATENTS_STD),
        )
    return vae.eval().requires_grad_(False)


def convert_original_vae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`Wan2.1_VAE.pth` names (`encoder.downsamples.3.residual.2.weight`, ...) -> diffusers names.

    Uses diffusers' own converter (`convert_wan_vae_to_diffusers`, shipped in the wheel), which
    passes names it does not know through unchanged, so a foreign key still fails the strict check.
    """
    return convert_wan_vae_to_diffusers(dict(state_dict))


@dataclass(eq=False)
class VAEStreamState:
    """One session's causal decoder cache: a list with one slot per causal conv of the decoder."""

    feat_cache: list = field(default_factory=list)
    latents_decoded: int = 0
    decoder_calls: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.feat_cache if isinstance(t, torch.Tensor))


class WanVAE:
    """Encode pictures to normalised latents and decode latents back, without state on the module."""

    def __init__(self, model: AutoencoderKLWan, decode_chunk: int = 3) -> None:
        """`decode_chunk`: latent frames per decoder call after a stream's first. The decoder is
        causal with a cache of the last two frames per conv, so any chunking gives the same frames
        (checked to fp32 round-off); a whole block per call (3) keeps the GPU busier than 1."""
        self.model = model
        self.decode_chunk = max(1, decode_chunk)
        cfg = model.config
        self.z_dim = cfg.z_dim
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(-1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(-1, 1, 1, 1)
        self.num_decoder_convs = model._cached_conv_counts["decoder"]
        self.num_encoder_convs = model._cached_conv_counts["encoder"]

    @property
    def device(self) -> torch.device:
        return self.model.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.quant_conv.weight.dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[3, T, H, W] in [-1, 1] (T = 1 + 4k) -> normalised latent mean [16, 1 + k, H/8, W/8].

        Chunks of 1, 4, 4, ... frames through one local cache, exactly like the original encode (docs/model.md §7.2).
        """
        if video.dim() != 4 or (video.shape[1] - 1) % 4:
            raise ValueError(f"expected video [3, 1+4k, H, W], got {tuple(video.shape)}")
        x = video.unsqueeze(0).to(self.device, self.dtype)
        cache: list = [None] * self.num_encoder_convs
        chunks = [x[:, :, :1]] + (list(x[:, :, 1:].split(4, dim=2)) if x.shape[2] > 1 else [])
        out = torch.cat([self.model.encoder(c, feat_cache=cache, feat_idx=[0]) for c in chunks], dim=2)
        mu = self.model.quant_conv(out)[:, : self.z_dim]
        return self.normalize(mu[0])

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        return ((mu.float() - self.mean.to(mu.device)) / self.std.to(mu.device)).to(mu.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() * self.std.to(z.device) + self.mean.to(z.device)).to(self.dtype)

    def new_stream(self) -> VAEStreamState:
        return VAEStreamState(feat_cache=[None] * self.num_decoder_convs)

    @torch.no_grad()
    def decode_stream(self, state: VAEStreamState, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents [16, n, h, w], continuing `state`.

        The stream's first latent yields 1 frame (decoded alone, as the original's first chunk),
        every later one 4 (docs/model.md §7.2), `decode_chunk` latents per call; the result is clamped to [-1, 1]
        and has shape [3, frames, 8h, 8w].
        """
        x = self.model.post_quant_conv(self.denormalize(latents.to(self.device)).unsqueeze(0))
        frames = []
        if state.latents_decoded == 0 and x.shape[2]:
            first = x[:, :, :1].clone(memory_format=torch.contiguous_format)  # canonical strides: see below
            frames.append(self._decoder(state)(first, state.feat_cache, [0], first_chunk=True))
            _canonical_strides(state.feat_cache)
            state.latents_decoded, x = 1, x[:, :, 1:]
        for chunk in x.split(self.decode_chunk, dim=2) if x.shape[2] else ():
            # A fresh tensor with canonical strides: a compiled decoder guards on every stride (even the
            # batch dim's, which `.contiguous()` keeps), so a chunk sliced out of the warm-up's longer
            # call would not match a block's and cost a recompile in every process's first stream.
            chunk = chunk.clone(memory_format=torch.contiguous_format)
            frames.append(self._decoder(state)(chunk, state.feat_cache, [0], first_chunk=False))
            _canonical_strides(state.feat_cache)
            state.latents_decoded += chunk.shape[2]
        return torch.cat(frames, dim=2)[0].clamp(-1.0, 1.0)

    def _decoder(self, state: VAEStreamState) -> Callable[..., torch.Tensor]:
        """The decoder for the stream's next call: its first two calls (empty caches, then one-frame
        caches) run eagerly, every later one through `__call__` (compiled by `compile_vae`, if it was).
        Those two happen once per session, while it opens; compiled, each was a variant of its own: a
        whole-decoder trace at every start and an inductor compile at a cold one, to save a fraction of
        a second once per session. So a compiled decoder holds one graph, the steady one."""
        state.decoder_calls += 1
        decoder = self.model.decoder
        return decoder.forward if state.decoder_calls <= 2 else decoder

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole-clip decode with a fresh cache (what the original non-streaming `decode` does)."""
        return self.decode_stream(self.new_stream(), latents)


def _canonical_strides(cache: list) -> None:
    """Give every cached tensor the strides of a fresh contiguous tensor, in place in the list.

    diffusers stores a conv's cache as a slice of its last input (`x[:, :, -2:]`), which keeps that
    input's batch stride: 3 frames' worth after a 3-latent chunk, 2 after a 1-latent one. A compiled
    decoder guards on every stride, so each such difference was a recompile of the whole decoder, in
    every process's first streams (seen with TORCH_LOGS=recompiles: `feat_cache[4]` stride mismatch,
    one variant per cached conv, on the CPU and on an H200). The copy is of two frames per conv."""
    for i, t in enumerate(cache):
        if isinstance(t, torch.Tensor) and t.stride() != _contiguous_strides(t.shape):
            cache[i] = t.clone(memory_format=torch.contiguous_format)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class StreamingDecoder:
    """Causal per-session decode: `warm_up` once per stream, then `decode` each finished block.

    Warm-up (TPP mode, docs/model.md §7.3): stream-decode the first 7 motion latents (the static reference
    video) and discard the 25 frames. This primes every temporal cache with the avatar, so the first
    generated latent decodes to 4 frames like every later one and a block always gives 12 frames.
    """

    warm_up_latents = 7

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae

    def new_state(self, motion_latents: torch.Tensor | None = None) -> VAEStreamState:
        state = self.vae.new_stream()
        if motion_latents is not None:
            self.vae.decode_stream(state, motion_latents[:, : self.warm_up_latents])
        return state

    def decode(self, state: VAEStreamState, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_stream(state, latents)
