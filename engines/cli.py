"""`liveavatar engines build|list`: export step graphs to ONNX, build TensorRT engines, list the cache.

The engines package does not know which modules to export: `--targets` names a factory
(`package.module:function`) that returns `ExportTarget`s; the application supplies its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class ExportTarget:
    """One functional step to export: state goes in and comes out as explicit tensors."""

    name: str
    module: Any
    inputs: tuple
    input_names: list[str]
    output_names: list[str]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="export ONNX graphs (and TensorRT engines) into the engine cache")
    build.add_argument(
        "--targets", help="factory returning ExportTargets (module:function); the liveavatar command sets it"
    )
    build.add_argument("--arch", default="tiny", help="passed to the targets factory (e.g. a model size name)")
    build.add_argument("--size", default="704*384", help="passed to the factory: output width*height")
    build.add_argument("--device", default="cpu", help="device the modules are built on for export")
    build.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs tensorrt)")
    build.add_argument("--check", action="store_true", help="run each graph with onnxruntime and compare with PyTorch")
    build.add_argument("--cache", default=None, help="engine cache folder (default ~/.cache/liveavatar/engines)")
    lst = sub.add_parser("list", help="list cached engines")
    lst.add_argument("--cache", default=None)


def run(args: argparse.Namespace) -> int:
    from engines.cache import DEFAULT_ROOT, EngineCache

    cache = EngineCache(args.cache or DEFAULT_ROOT)
    if args.action == "list":
        entries = cache.entries()
        if not entries:
            print(f"no engines in {cache.root}")
        for e in entries:
            print(
                f"{e['file']:50s} {e['bytes'] / 2**20:9.1f} MiB  {e['extra']:12s} "
                f"{e['shapes'][0]}  {e['device']}  {e['created']}"
            )
        return 0
    return build(args, cache)


def build(args: argparse.Namespace, cache) -> int:
    from engines.cache import EngineKey
    from engines.onnx_export import OnnxRunner, compare, export_onnx

    spec = args.targets or getattr(args, "default_targets", None)  # the application's, set by its CLI
    if not spec:
        raise SystemExit("engines build: --targets module:function is required (the factory of the graphs to export)")
    module_name, _, func = spec.partition(":")
    targets: list[ExportTarget] = getattr(importlib.import_module(module_name), func)(args.arch, args.size, args.device)
    for t in targets:
        key = EngineKey.of("onnx", t.module, t.inputs, extra=t.name)
        path = cache.get(key, "onnx")
        if path is None:
            path = export_onnx(t.module, t.inputs, cache.path(key, "onnx"), t.input_names, t.output_names)
            cache.put(key, "onnx", path.read_bytes())
        print(f"{t.name}: onnx {path}")
        if args.check:
            print(f"{t.name}: onnxruntime vs torch: {compare(t.module, OnnxRunner(path), t.inputs)}")
        if args.tensorrt:
            from engines.tensorrt import cached_engine

            plan = cached_engine(cache, EngineKey.of("trt", t.module, t.inputs, extra=t.name, model=key.model), path)
            print(f"{t.name}: tensorrt {plan}")
    print(json.dumps({"cache": str(cache.root), "targets": [t.name for t in targets]}))
    return 0
