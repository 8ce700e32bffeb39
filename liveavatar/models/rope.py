"""3D rotary position embedding of the LiveAvatar DiT, and the token positions it is applied at.

Numerics follow the original on purpose (docs/model.md §3.5): each head vector is read as complex numbers from
adjacent pairs; the rotation factors are computed in float64 and then rounded to float16 (LiveAvatar
stores them as complex-half, unlike upstream Wan2.2); the rotation itself is done in float64. The
factors are computed from the positions directly instead of indexing a 45000-row table, which gives
the same values (angle = position * frequency in float64) and has no length limit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

THETA = 10000.0
REF_FRAME = 30
"""Time position of the reference ("sink") tokens in the prefill, and the floor of its streaming shift."""
MOTION_1X_FRAME = -1
MOTION_2X_FRAME = -3
MOTION_4X_FRAMES = (-19, -14, -9, -4)


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (time, height, width): 22/21/21 for head_dim 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freqs(pairs: int, device: torch.device) -> torch.Tensor:
    dim = 2 * pairs
    return 1.0 / torch.pow(THETA, torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def rope_factors(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """complex128 [L, head_dim/2] rotation factors for integer positions [L, 3] = (t, y, x), computed
    on the positions' device.

    cos/sin are rounded to float16 and widened back, exactly the values of the original's
    complex-half table (negative positions give the conjugate, as there).
    """
    parts = []
    for axis, pairs in enumerate(axis_pairs(head_dim)):
        angles = positions[:, axis : axis + 1].to(torch.float64) * _inv_freqs(pairs, positions.device)[None]
        parts.append(torch.complex(torch.cos(angles).half().double(), torch.sin(angles).half().double()))
    return torch.cat(parts, dim=1)


def rotate(x: torch.Tensor, table: torch.Tensor, arithmetic: str = "complex") -> torch.Tensor:
    """Rotate x [B, L, H, D] by the factors `table` [L, D/2, 2] = (cos, sin): the one RoPE rotation of
    the model, of its compiled form and of its ONNX export.

    Each head vector is read as D/2 complex numbers from adjacent pairs (x[2p], x[2p+1]); the rotation
    runs in the table's dtype (float64 in the model, as the original; float32 in the ONNX export, as
    TensorRT has no float64) and the result comes back in x's dtype via float32. `arithmetic`:
    "complex" is one complex multiply, the fastest eager form; "real" spells out the same products and
    sums (the same numbers) on real tensors, which inductor fuses into one pass and ONNX can express.
    """
    b, length, h, d = x.shape
    pairs = x.to(table.dtype).reshape(b, length, h, d // 2, 2)
    if arithmetic == "complex":
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(table)[None, :, None])
    elif arithmetic == "real":
        re, im = pairs.unbind(-1)
        c, s = table[None, :, None, :].unbind(-1)
        out = torch.stack([re * c - im * s, re * s + im * c], dim=-1)
    else:
        raise ValueError(f"arithmetic must be 'complex' or 'real', got {arithmetic!r}")
    return out.reshape(b, length, h, d).float().to(x.dtype)


def apply_rope(
    x: torch.Tensor, factors: torch.Tensor, arithmetic: str = "complex", kernel: Callable = rotate
) -> torch.Tensor:
    """Rotate x [B, L, H, D] by the complex128 factors [L, D/2] of `rope_factors`; result in x's dtype.
    `kernel` is `rotate` or a compiled copy of it (`liveavatar.acceleration.accelerate.compile_rope`)."""
    return kernel(x, torch.view_as_real(factors.to(x.device)), arithmetic)


def grid_positions(frames: list[int] | range, rows: list[int] | range, cols: list[int] | range) -> torch.Tensor:
    """Positions [len(frames)*len(rows)*len(cols), 3] in token order (frame-major, then row, column)."""
    f = torch.as_tensor(list(frames), dtype=torch.long)
    y = torch.as_tensor(list(rows), dtype=torch.long)
    x = torch.as_tensor(list(cols), dtype=torch.long)
    grid = torch.stack(torch.meshgrid(f, y, x, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def _sampled(n_out: int, n_in: int) -> list[int]:
    """numpy linspace(0, n_in-1, n_out) truncated to int: FramePack's coarse rows/columns."""
    return np.linspace(0, n_in - 1, n_out).astype(int).tolist()


def block_positions(frame_start: int, num_frames: int, hp: int, wp: int) -> torch.Tensor:
    """Noisy tokens of absolute latent frames frame_start.. : (f, y, x)."""
    return grid_positions(range(frame_start, frame_start + num_frames), range(hp), range(wp))


def motion_positions(hp: int, wp: int) -> torch.Tensor:
    """FramePack tokens [1x ; 2x ; 4x] at fixed negative times (never shifted while streaming)."""
    one = grid_positions([MOTION_1X_FRAME], range(hp), range(wp))
    two = grid_positions([MOTION_2X_FRAME], _sampled(hp // 2, hp), _sampled(wp // 2, wp))
    four = grid_positions(MOTION_4X_FRAMES, _sampled(hp // 4, hp), _sampled(wp // 4, wp))
    return torch.cat([one, two, four])


def cond_positions(hp: int, wp: int, ref_frame: int = REF_FRAME) -> torch.Tensor:
    """Condition tokens [reference ; motion]; the reference sits at time `ref_frame`."""
    return torch.cat([grid_positions([ref_frame], range(hp), range(wp)), motion_positions(hp, wp)])


def sink_ref_frame(frame_start: int, shift: int) -> int:
    """Streaming time position of the reference keys: `shift` frames ahead of the block, never before 30."""
    return max(REF_FRAME, frame_start + shift)
