"""Export a functional step module to ONNX, run it with onnxruntime, and compare with PyTorch.

"Functional" means the module takes every piece of state it reads (KV caches, conv caches) as
explicit inputs and returns every piece it changes as explicit outputs: an ONNX graph (and a
TensorRT engine built from it) has no persistent state and no in-place updates, so the caller owns
the caches and feeds them back in on the next call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def export_onnx(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: Path | str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = 18,
) -> Path:
    """Trace `module(*example_inputs)` with the dynamo exporter into a static-shape ONNX file.

    Shapes are static on purpose: a block step has one shape per output size, and static shapes
    let onnxruntime / TensorRT pick the best kernels without optimization profiles.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            tuple(example_inputs),
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program
    # big models (>2 GB of weights) must keep their weights next to the graph
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1_800_000_000
    program.save(str(path), external_data=big)
    log.info("onnx: exported %s to %s in %.1f s", type(module).__name__, path, time.perf_counter() - start)
    return path


class OnnxRunner:
    """Runs an exported graph with onnxruntime on torch tensors (CPU, or CUDA if its provider exists)."""

    def __init__(self, path: Path | str, device: str = "cpu") -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # onnxruntime's numpy bridge has no bfloat16: feed bf16 graphs only fp32/fp16 inputs
        feed = {name: _to_numpy(t) for name, t in zip(self.input_names, inputs, strict=True)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@dataclass
class Comparison:
    """Per-output relative error ‖onnx − torch‖ / ‖torch‖ and max absolute difference."""

    names: list[str]
    rel: list[float]
    max_abs: list[float]

    def worst(self) -> float:
        return max(self.rel)

    def __str__(self) -> str:
        return ", ".join(
            f"{n}: rel {r:.2e} max {a:.2e}" for n, r, a in zip(self.names, self.rel, self.max_abs, strict=True)
        )


def compare(module: nn.Module, runner: OnnxRunner, inputs: Sequence[torch.Tensor]) -> Comparison:
    """Run both on the same inputs and measure how far the exported graph is from PyTorch."""
    with torch.no_grad():
        ref = module(*inputs)
    ref = ref if isinstance(ref, tuple | list) else (ref,)
    got = runner(*inputs)
    rel, max_abs = [], []
    for r, g in zip(ref, got, strict=True):
        r, g = r.detach().double().cpu(), g.double()
        diff = (g.reshape(r.shape) - r).norm().item()
        rel.append(diff / max(r.norm().item(), 1e-30))
        max_abs.append((g.reshape(r.shape) - r).abs().max().item() if r.numel() else 0.0)
    return Comparison(list(runner.output_names), rel, max_abs)
