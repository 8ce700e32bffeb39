"""Audio path of the LiveAvatar DiT: the causal conv audio encoder and the per-frame audio injectors.

Names follow the checkpoint (`casual_audio_encoder.*` keeps the original's spelling). The encoder runs
in float32 whatever the weight dtype (the original wraps it in an fp32 autocast region); only the
layer mix happens in the compute dtype, as there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from liveavatar.models.attention import AudioCrossAttention


def _fp32_conv1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    return F.conv1d(x.float(), conv.weight.float(), conv.bias.float(), stride=conv.stride)


def _fp32_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), linear.weight.float(), linear.bias.float())


class CausalConv1d(nn.Module):
    """Conv1d (kernel 3) that only looks back: the time axis is left-padded by replicating step 0."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp32_conv1d(self.conv, F.pad(x.float(), (2, 0), mode="replicate"))


def _ln_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6))


class MotionEncoder(nn.Module):
    """Strided causal convs over time: 4 local audio tokens (+1 learned padding token) and one global
    vector per latent frame. conv2/conv3 are shared by the local and global branches."""

    def __init__(self, in_dim: int, hidden_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, T] after conv1 -> LN/SiLU -> conv2 -> LN/SiLU -> conv3 -> LN/SiLU, as [N, T3, C]."""
        x = _ln_silu(x.transpose(1, 2)).transpose(1, 2)
        x = _ln_silu(self.conv2(x).transpose(1, 2)).transpose(1, 2)
        return _ln_silu(self.conv3(x).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, in_dim] -> (global [B, T3, 1, C], tokens [B, T3, num_tokens+1, C]), float32."""
        b = x.shape[0]
        x = x.transpose(1, 2)  # [B, C_in, T]
        local = self.conv1_local(x)  # [B, n*c, T]
        n = self.num_tokens
        local = local.reshape(b, n, -1, local.shape[-1]).reshape(b * n, -1, local.shape[-1])
        local = self._tail(local)  # [B*n, T3, C]
        local = local.reshape(b, n, *local.shape[1:]).transpose(1, 2)  # [B, T3, n, C]
        pad = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)
        tokens = torch.cat([local, pad], dim=2)
        glob = _fp32_linear(self.final_linear, self._tail(self.conv1_global(x)))
        return glob[:, :, None], tokens


class CausalAudioEncoder(nn.Module):
    """wav2vec2 hidden states [B, L, C, T] -> per-latent-frame audio tokens and AdaIN vectors."""

    def __init__(self, audio_dim: int, out_dim: int, num_tokens: int, num_layers: int = 25):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.encoder = MotionEncoder(audio_dim, out_dim, num_tokens)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The layer mix runs in the features' dtype (bf16 in the original), in this exact order.
        w = F.silu(self.weights.to(features.dtype))
        mixed = ((features * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C, T]
        return self.encoder(mixed.transpose(1, 2))


class AdaLayerNorm(nn.Module):
    """diffusers-style AdaLayerNorm (chunk_dim=1): shift comes *first*, LN eps is 1e-5."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [N, T, C] (N groups of T tokens); emb [S, N/S, C], one vector per group, S sessions' in turn.
        Each session's vectors are projected on their own: a product of so few rows (3) is not
        row-independent on every BLAS (MKL takes another path for 3 rows than for 6), and a session's
        numbers must not depend on its batch; the cost is nil."""
        projected = [self.linear(F.silu(emb[i : i + 1])) for i in range(emb.shape[0])]
        proj = projected[0] if len(projected) == 1 else torch.cat(projected)
        shift, scale = proj.reshape(-1, 2 * emb.shape[-1]).chunk(2, dim=-1)
        normed = F.layer_norm(x.float(), x.shape[-1:], eps=1e-5)
        return normed * (1 + scale).float()[:, None] + shift.float()[:, None]


class AudioInjector(nn.Module):
    """Twelve (in the 14B model) audio cross-attentions, applied after the listed DiT blocks."""

    def __init__(self, dim: int, num_heads: int, inject_layers: tuple[int, ...], eps: float = 1e-6):
        super().__init__()
        self.injector = nn.ModuleList(AudioCrossAttention(dim, num_heads, eps) for _ in inject_layers)
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim) for _ in inject_layers)
        self.layer_to_index = {layer: j for j, layer in enumerate(inject_layers)}

    def forward(self, j: int, x: torch.Tensor, tokens: torch.Tensor, global_emb: torch.Tensor) -> torch.Tensor:
        """x [S, F*fsl, C] noisy tokens of S sessions' blocks; tokens [S*F, 5, C] and global_emb [S*F, C]
        per latent frame, session 0's frames first -> x + audio residual. Each frame's tokens are
        modulated by and attend to that frame's audio only; the linears see one session per row."""
        sessions, dim = x.shape[0], x.shape[-1]
        frames = tokens.shape[0] // sessions
        xf = x.reshape(sessions * frames, -1, dim)
        u = self.injector_adain_layers[j](xf, global_emb.reshape(sessions, frames, dim)).to(x.dtype)
        out = self.injector[j](u.reshape(x.shape), tokens.reshape(sessions, -1, dim), frames)
        return x + out
