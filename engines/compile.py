"""torch.compile for repeated regions, and CUDA-graph replay of a whole fixed-shape step.

Two separate tools, because they fix different costs:
- `compile_regions` fuses the element-wise work around the matmuls (norms, modulation, RoPE, gates).
  Compiling each repeated block on its own ("regional compilation") keeps cold-start compile time to
  one block instead of the whole 40-layer stack; identical blocks reuse the same compiled code.
- `CUDAGraphRunner` removes per-kernel launch overhead by capturing one whole call (e.g. one
  denoising step of one block) and replaying it. Large state tensors that the step updates in place
  (KV caches) stay where they are; only the small per-call inputs are copied into the graph's buffers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)


def compile_regions(
    module: nn.Module,
    region_types: Iterable[type[nn.Module]] | None = None,
    *,
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
) -> nn.Module:
    """Compile, in place, every submodule of one of `region_types` (or the whole module if None).

    Returns `module`. Compiling the whole module instead makes dynamo unroll every layer, which for
    a 40-layer 14B DiT costs minutes at start for no extra speed: the layers are identical.
    """
    options = {"backend": backend, "mode": mode, "fullgraph": fullgraph, "dynamic": False}
    if region_types is None:
        module.compile(**options)
        log.info("compile: whole %s (backend=%s, mode=%s)", type(module).__name__, backend, mode)
        return module
    types = tuple(region_types)
    regions = [m for m in module.modules() if isinstance(m, types)]
    if not regions:
        raise ValueError(f"no submodule of type {[t.__name__ for t in types]} to compile")
    for m in regions:
        m.compile(**options)
    log.info(
        "compile: %d regions of %s (backend=%s, mode=%s)", len(regions), [t.__name__ for t in types], backend, mode
    )
    return module


class CUDAGraphRunner:
    """Calls `fn(*args)` through captured CUDA graphs, one per distinct call signature.

    Positional arguments listed in `static_args` are state the step reads and updates in place
    (caches): the graph uses their storage directly, so they must stay at the same addresses between
    calls; a different set of state tensors (another session) gets its own graph. Every other tensor
    is copied into a graph-owned buffer before each replay, and non-tensor arguments (ints, flags)
    become part of the signature: keep them to a few distinct values or each one captures anew; other
    objects count by identity. Capturing is not thread-safe: drive a runner from one thread.
    Outputs are cloned, so a result stays valid after the next replay.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        static_args: Iterable[int] = (),
        warmup: int = 2,
        max_graphs: int = 8,
        pool: Any = None,
    ) -> None:
        """`pool` (`torch.cuda.graph_pool_handle()`) lets runners share one memory pool for their
        graphs' intermediates; safe while their graphs never replay at the same time."""
        self.fn = fn
        self.static_args = frozenset(static_args)
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.pool = pool

    def __call__(self, *args: Any) -> Any:
        key = self._signature(args)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(args)
            self.graphs[key] = captured
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        for buf, t in zip(captured.inputs, self._dynamic_leaves(args), strict=True):
            buf.copy_(t, non_blocking=True)
        captured.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, captured.outputs)

    def _signature(self, args: tuple) -> tuple:
        parts: list[tuple] = []
        for i, arg in enumerate(args):
            for leaf in pytree.tree_leaves(arg):
                if isinstance(leaf, torch.Tensor):
                    ptr = leaf.data_ptr() if i in self.static_args else None
                    parts.append((i, tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, ptr))
                elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                    parts.append((i, leaf))
                else:
                    # objects by identity, not by reference: a runner stored on the object it is
                    # called with (a session's cache) must not keep that object alive in its keys
                    parts.append((i, type(leaf).__name__, id(leaf)))
        return tuple(parts)

    def _dynamic_leaves(self, args: tuple) -> list[torch.Tensor]:
        return [
            leaf
            for i, arg in enumerate(args)
            if i not in self.static_args
            for leaf in pytree.tree_leaves(arg)
            if isinstance(leaf, torch.Tensor)
        ]

    def _capture(self, args: tuple) -> _Captured:
        """Warm up on a side stream (lazy inits, autotuning), then capture with buffered inputs."""
        buffered = []
        for i, arg in enumerate(args):
            if i in self.static_args:
                buffered.append(arg)
            else:
                buffered.append(pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, arg))
        # warm-up runs write the static state too: fine for steps that *write* state from their
        # inputs (a KV-cache slot), which repeat idempotently; not for steps that accumulate into it
        stream = _side_stream(torch.cuda.current_device())
        with _CAPTURE_LOCK:  # a capture empties the allocator's caches on every device: one at a time
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self.fn(*buffered)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # The capture runs on this device's side stream (torch's default capture stream is made
            # once, on whichever device was current). thread_local: other threads may keep launching
            # work while this one captures (a server encoding a new avatar on a helper thread).
            with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
                outputs = self.fn(*buffered)
        self.pool = graph.pool()
        log.info("cuda graph captured (%d cached)", len(self.graphs) + 1)
        return _Captured(graph, self._dynamic_leaves(tuple(buffered)), outputs)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_CAPTURE_LOCK = threading.Lock()


def pool_nbytes(pool: Any, device: int | None = None) -> int:
    """Device memory held by the graph memory pool `pool` (a `graph_pool_handle()` / `graph.pool()`),
    summed over its segments in the allocator's snapshot; 0 when the snapshot does not say."""
    wanted = tuple(pool) if isinstance(pool, tuple | list) else pool
    total = 0
    try:
        for segment in torch.cuda.memory_snapshot():
            seg_pool = segment.get("segment_pool_id")
            seg_pool = tuple(seg_pool) if isinstance(seg_pool, tuple | list) else seg_pool
            if seg_pool == wanted and (device is None or segment.get("device") == device):
                total += int(segment.get("total_size", 0))
    except (RuntimeError, TypeError, ValueError) as exc:
        log.debug("graph pool size unknown: %s", exc)
    return total


def _side_stream(device: int) -> torch.cuda.Stream:
    """One warm-up stream per device for every capture: cuBLAS keeps a workspace per stream it ran
    on, so a new stream per capture (one per session and step in a server) leaked one each time
    (~0.4 GiB after ten captures on an H200)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], outputs: Any) -> None:
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


def persistent_compile_cache(root: str | os.PathLike[str], device: torch.device | str | None = None) -> Path:
    """Keep torch.compile's artifacts (inductor's FX-graph and autotuning caches, the Triton kernels,
    AOTAutograd's cache) under `root`, so a second start with the same model, size and engine loads
    compiled kernels instead of building them again (minutes for the 14B DiT and the VAE).

    The folder is one per GPU model, CUDA and torch version (`engines.cache.device_tag`); inside it
    inductor keys every entry by the traced graph (so the code), its input shapes (so the size) and
    its own configuration, so anything that changes the kernels misses the cache and rebuilds.
    Must be called before the first compile of the process; returns the folder used.
    """
    import hashlib

    from engines.cache import device_tag

    tag = device_tag(device)
    folder = Path(root) / "torch-compile" / hashlib.sha256(tag.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "device.txt").write_text(tag + "\n")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    with contextlib.suppress(ImportError, AttributeError):
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    log.info("torch.compile cache: %s (%s)", folder, tag)
    return folder
