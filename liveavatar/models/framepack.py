"""FramePack motion tokens: the recent past, compressed more the older it is (docs/model.md §3.8)."""

from __future__ import annotations

import torch
import torch.nn as nn

BUCKETS = (1, 2, 16)
"""Latent frames per bucket, newest first: 1 frame at full detail, 2 at 2x, 16 at 4x compression."""


class FramePackMotioner(nn.Module):
    """Motion latents [16, Tm, h, w] -> tokens [1x ; 2x ; 4x] of length 1.5 * tokens-per-frame."""

    def __init__(self, dim: int, in_channels: int = 16):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_channels, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_channels, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion_latents: torch.Tensor) -> torch.Tensor:
        c, frames, h, w = motion_latents.shape
        total = sum(BUCKETS)
        # Fewer motion frames than the buckets hold are zero-padded at the old end ("padd" mode).
        packed = motion_latents.new_zeros(c, total, h, w)
        keep = min(total, frames)
        if keep:
            packed[:, total - keep :] = motion_latents[:, frames - keep :]
        old, mid, new = packed.unsqueeze(0).split(BUCKETS[::-1], dim=2)
        tokens = [
            proj(x).flatten(2).transpose(1, 2)
            for proj, x in ((self.proj, new), (self.proj_2x, mid), (self.proj_4x, old))
        ]
        return torch.cat(tokens, dim=1)  # [1, 1.5 * fsl, dim]
