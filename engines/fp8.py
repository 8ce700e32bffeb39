"""Per-tensor E4M3 FP8 linears: weights quantized once, activations per call.

The recipe is the reference's `--fp8` path: one scale per whole weight matrix and one per whole
flattened activation, `torch._scaled_mm` with fast accumulation, bf16 out. On a GPU without FP8
matrix units (or on the CPU) the same quantize → dequantize product is emulated in fp32, so the
numbers (up to accumulation order) and the tests do not need Hopper.

`per_sample`: the activation's first axis indexes independent samples (a model that batches several
sessions' blocks in one forward), each quantized with its own scale, so a sample's result does not
depend on what it is batched with; one sample is exactly the per-tensor recipe. Several samples run as
one `_scaled_mm` with a per-row activation scale (the row-wise kernel).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3fn quantization; returns (fp8 values, fp32 dequant scale 1/s)."""
    scale = _scale(x.detach().abs().amax().float())
    xq = torch.clamp(x.float() * scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq, scale.reciprocal()


def quantize_samples(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` of each x[i] on its own: x [S, ...] -> (fp8 values like x, dequant scales [S])."""
    flat = x.reshape(x.shape[0], -1)
    scale = _scale(flat.detach().abs().amax(dim=1).float())
    xq = torch.clamp(flat.float() * scale[:, None], -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq.reshape(x.shape), scale.reciprocal()


def _scale(amax: torch.Tensor) -> torch.Tensor:
    # min(..., 448) keeps an all-zero tensor from getting an infinite scale (reference formula)
    return torch.clamp(FP8_MAX / torch.clamp(amax, min=1e-12), max=FP8_MAX)


def scaled_mm_supported(device: torch.device) -> bool:
    """True where `torch._scaled_mm` runs FP8 on tensor cores (Ada / Hopper and newer)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_inv_scale: torch.Tensor,
    bias: torch.Tensor | None,
    emulate: bool,
    per_sample: bool = False,
) -> torch.Tensor:
    """y = x Wᵀ + b with both operands in per-tensor FP8; result in x's dtype. `per_sample`: one
    activation scale per x[i] (module docstring)."""
    shape = x.shape
    if per_sample and x.ndim > 1 and shape[0] > 1:
        return _fp8_linear_samples(x, wq, w_inv_scale, bias, emulate)
    x2 = x.reshape(-1, shape[-1])
    xq, x_inv_scale = quantize(x2)
    if emulate:
        y = _emulated_scaled_mm(xq, wq, x_inv_scale * w_inv_scale, bias)
    else:
        rows = xq.shape[0]
        if rows % 16:  # keep the kernel's shape rule; zero rows do not change the scales
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, 16 - rows % 16)).view(FP8_DTYPE)
        y = torch._scaled_mm(
            xq,
            wq.t(),  # [in, out] view of a row-major [out, in] weight: the column-major B it wants
            scale_a=x_inv_scale,
            scale_b=w_inv_scale,
            bias=None if bias is None else bias.to(torch.bfloat16),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )[:rows]
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])


def _emulated_scaled_mm(
    xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What `torch._scaled_mm` computes, without the kernel: xq wqᵀ accumulated in fp32, times the
    dequantization `scale` (a scalar, or one per row), bias added, one rounding to bfloat16."""
    y = (xq.float() @ wq.float().t()) * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16)


def _fp8_linear_samples(
    x: torch.Tensor, wq: torch.Tensor, w_inv_scale: torch.Tensor, bias: torch.Tensor | None, emulate: bool
) -> torch.Tensor:
    """`fp8_linear` of S samples x [S, ..., K] in one product, each row dequantized with its sample's
    scale: the numbers of S separate calls (the emulation computes them the same way, row by row)."""
    shape = x.shape
    xq, inv = quantize_samples(x)
    xq = xq.reshape(-1, shape[-1])
    rows = xq.shape[0]
    row_inv = inv.repeat_interleave(rows // shape[0])[:, None]  # [rows, 1]
    if emulate:
        y = _emulated_scaled_mm(xq, wq, row_inv * w_inv_scale, bias)
    else:
        if rows % 16:  # the kernel's shape rule, as for one sample; padded rows are zeros, scale 1
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, 16 - rows % 16)).view(FP8_DTYPE)
            row_inv = F.pad(row_inv, (0, 0, 0, 16 - rows % 16), value=1.0)
        y = torch._scaled_mm(
            xq,
            wq.t(),
            scale_a=row_inv.contiguous(),
            scale_b=w_inv_scale.reshape(1, 1).expand(1, wq.shape[0]).contiguous(),
            bias=None if bias is None else bias.to(torch.bfloat16),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )[:rows]
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])


class FP8Linear(nn.Module):
    """Drop-in for `nn.Linear` holding an e4m3fn weight and its dequant scale."""

    weight_fp8: torch.Tensor  # buffers (register_buffer below); declared so they type as tensors
    weight_inv_scale: torch.Tensor

    def __init__(self, linear: nn.Linear, emulate: bool | None = None, per_sample: bool = False) -> None:
        """`per_sample`: one activation scale per x[i] (module docstring)."""
        super().__init__()
        self.per_sample = per_sample
        self.in_features, self.out_features = linear.in_features, linear.out_features
        wq, inv_scale = quantize(linear.weight.data)
        self.register_buffer("weight_fp8", wq.contiguous())
        self.register_buffer("weight_inv_scale", inv_scale)
        bias = linear.bias.data.to(torch.bfloat16) if linear.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        if emulate is None:
            emulate = not scaled_mm_supported(wq.device) or bool(self.in_features % 16 or self.out_features % 16)
        self.emulate = bool(emulate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight_fp8, self.weight_inv_scale, self.bias, self.emulate, self.per_sample)

    def extra_repr(self) -> str:
        mode = "emulated" if self.emulate else "scaled_mm"
        scope = "per-sample" if self.per_sample else "per-tensor"
        return f"in={self.in_features}, out={self.out_features}, e4m3fn {scope}, {mode}"


def convert_linears_to_fp8(
    module: nn.Module, skip: Iterable[str] = (), emulate: bool | None = None, per_sample: bool = False
) -> list[str]:
    """Replace every `nn.Linear` whose qualified name contains none of `skip`; returns the names.
    `per_sample`: the converted linears scale each sample of a batch on its own (module docstring).

    The skip list is the caller's (it is model knowledge, e.g. embeddings and heads that are
    sensitive to quantization). Each layer is converted and its bf16 weight dropped before the
    next, so peak memory grows by one layer, not by the model.
    """
    skip = tuple(skip)
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and not any(s in name for s in skip)
    ]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, FP8Linear(linear, emulate=emulate, per_sample=per_sample))
        linear.weight = None  # type: ignore[assignment]  # free the high-precision copy now
    log.info("fp8: converted %d linears (skipped names containing %s)", len(targets), skip)
    return [name for name, _ in targets]


def reference_fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Independent float64 quantize/dequantize reference, for tests and error reports."""

    def qdq(t: torch.Tensor) -> torch.Tensor:
        s = min(FP8_MAX / max(t.abs().max().item(), 1e-12), FP8_MAX)
        return (t.double() * s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).double() / s

    y = F.linear(qdq(x.reshape(-1, x.shape[-1])), qdq(weight), None if bias is None else bias.double())
    return y.reshape(*x.shape[:-1], weight.shape[0])
