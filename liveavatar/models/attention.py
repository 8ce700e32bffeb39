"""The attention projections every DiT attention shares: q/k/v/o with whole-vector RMS qk-norm.

Self-attention, text cross-attention and the audio injectors have the same parameters
(`q`, `k`, `v`, `o`, `norm_q`, `norm_k`, the checkpoint names); only where keys come from differs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from engines.attention import attention


class RMSNorm(nn.Module):
    """RMS norm over the whole vector (not per head); statistics in fp32, then cast and scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    """q/k/v/o projections with whole-vector RMS qk-norm; used for self- and text cross-attention."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def qkv(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        context = x if context is None else context
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        return q, k, self._heads(self.v(context))

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(x.flatten(2))


class AudioCrossAttention(Attention):
    """Frame tokens attend to that frame's 5 audio tokens (qk RMS-normed, no RoPE, no mask)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        """x [S, F*fsl, C] and context [S, F*5, C] (S sessions' blocks of F latent frames) -> [S, F*fsl, C].
        The projections run over each session's tokens as one activation; the attention per frame."""
        q, k, v = self.qkv(x, context)

        def per_frame(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0] * frames, -1, *t.shape[2:])

        return self.out(attention(per_frame(q), per_frame(k), per_frame(v)).reshape(q.shape))
