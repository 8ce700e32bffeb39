"""One place that chooses the attention kernel, so models never pick one themselves.

All DiT attentions are plain, unmasked softmax attention with heads laid out [B, L, H, D]. The
fastest exact kernel for those shapes is chosen once (`select_backend`) and reported at start.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


@dataclass
class AttentionBackend:
    """The kernel every `attention()` call uses; `name` is what logs and benchmarks report."""

    name: str = "sdpa"

    def context(self):
        """SDPA backend restriction for this choice (no restriction for "sdpa" / "fa3")."""
        if self.name not in _SDPA_BACKENDS:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[self.name])])


_backend = AttentionBackend()


def current_backend() -> AttentionBackend:
    return _backend


def set_backend(name: str) -> AttentionBackend:
    """Force a backend: "sdpa" (PyTorch decides), "cudnn", "flash", "efficient", "math" or "fa3"."""
    if name != "sdpa" and name != "fa3" and name not in _SDPA_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}")
    if name == "fa3" and _fa3() is None:
        raise RuntimeError("attention backend 'fa3' asked for, but no FlashAttention-3 package is installed")
    _backend.name = name
    return _backend


def _fa3():
    try:
        import flash_attn_interface  # FlashAttention-3 (Hopper) ships under this name

        return flash_attn_interface
    except ImportError:
        return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v for [B, Lq, H, D] / [B, Lk, H, D] tensors, no mask; returns [B, Lq, H, D]."""
    if _backend.name == "fa3" and q.is_cuda:
        out = _fa3().flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    with _backend.context():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def select_backend(example: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> AttentionBackend:
    """Pick the fastest exact kernel for the example shapes (CUDA) or plain SDPA (CPU), and log it."""
    if example is None or not example[0].is_cuda:
        _backend.name = "sdpa"
        log.info("attention backend: sdpa (cpu)")
        return _backend
    q, k, v = example
    candidates = (["fa3"] if _fa3() is not None else []) + ["cudnn", "flash", "efficient"]
    timings: dict[str, float] = {}
    for name in candidates:
        _backend.name = name
        try:
            timings[name] = _time_cuda(lambda: attention(q, k, v))
        except RuntimeError as exc:  # kernel not available for these shapes/dtypes/GPU
            log.debug("attention backend %s unavailable: %s", name, exc)
    _backend.name = min(timings, key=timings.__getitem__) if timings else "sdpa"
    log.info("attention backend: %s (ms: %s)", _backend.name, {k: round(v, 3) for k, v in timings.items()})
    return _backend


def _time_cuda(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
