"""TensorRT: build a serialized engine from an ONNX graph, cache it, and run it on torch tensors.

Only real TensorRT is used here. Where the `tensorrt` package cannot be imported, every entry point
raises `EngineUnavailable` with the install instructions instead of falling back silently.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from engines.cache import EngineCache, EngineKey

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not importable. On a deployment host with an NVIDIA GPU install it from NVIDIA's "
    "index, matching the CUDA major version of your torch build, e.g. "
    "`pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12` (or tensorrt-cu13), "
    "then check with `python -c 'import tensorrt; print(tensorrt.__version__)'`."
)


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run in this environment (missing package or GPU)."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailable(INSTALL_HINT) from exc
    if not torch.cuda.is_available():
        raise EngineUnavailable("TensorRT engines need a CUDA GPU; none is visible to torch")
    return trt


def build_engine(onnx_path: Path | str, workspace_gib: float = 8.0) -> bytes:
    """Parse the ONNX graph and build a serialized plan; precision follows the graph's own dtypes.

    The network is created strongly typed, so a bf16 graph runs in bf16 exactly where PyTorch did
    instead of TensorRT choosing per-layer precisions on its own.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weight data resolves
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    log.info("tensorrt: built %s in %.0f s", onnx_path, time.perf_counter() - start)
    return bytes(plan)


def cached_engine(cache: EngineCache, key: EngineKey, onnx_path: Path | str, workspace_gib: float = 8.0) -> Path:
    """Path of the plan for `key`, building it from `onnx_path` only when the cache misses."""
    hit = cache.get(key, "plan")
    if hit is not None:
        log.info("tensorrt: cached engine %s", hit.name)
        return hit
    return cache.put(key, "plan", build_engine(onnx_path, workspace_gib))


class TensorRTRunner:
    """Runs a serialized engine on CUDA torch tensors through TensorRT's Python runtime."""

    def __init__(self, plan_path: Path | str, device: torch.device | str = "cuda") -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path} (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_names = [n for n, i in zip(names, is_input, strict=True) if i]
        self.output_names = [n for n, i in zip(names, is_input, strict=True) if not i]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self.trt
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.int8: torch.int8,
            trt.bool: torch.bool,
        }
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keep = []  # inputs converted here must outlive the asynchronous execution
        for name, t in zip(self.input_names, inputs, strict=True):
            t = t.to(self.device, self._torch_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in self.output_names:
            out = torch.empty(
                tuple(self.context.get_tensor_shape(name)), dtype=self._torch_dtype(name), device=self.device
            )
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return tuple(outputs)
