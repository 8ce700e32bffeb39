"""On-disk cache of built engines (TensorRT plans, ONNX graphs), keyed by what makes them valid.

A built engine is only valid for the weights it was built from, the exact input shapes and dtype,
and the GPU model plus software versions that built it. The key hashes all of these, so a stale
engine is never loaded: a changed input simply misses the cache and triggers a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

DEFAULT_ROOT = Path(os.environ.get("LIVEAVATAR_ENGINE_CACHE", Path.home() / ".cache" / "liveavatar" / "engines"))


def model_hash(module: nn.Module, sample: int = 64) -> str:
    """Hash of names, shapes, dtypes and a strided sample of every tensor's values.

    Hashing all 30+ GB of a 14B model would take minutes at every start; a fixed-stride sample of
    each tensor still changes with any checkpoint, LoRA merge or random seed we actually use.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(sample, flat.numel()), device=flat.device).long()
        vals = flat[idx]
        vals = vals.view(torch.uint8) if vals.dtype.itemsize == 1 else vals.float()
        h.update(vals.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def device_tag(device: torch.device | str | None = None) -> str:
    """GPU model and the software versions that make a built engine (non-)portable."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        cap = f"sm{major}{minor}"
        return f"{name}|{cap}|cuda{torch.version.cuda}|torch{torch.__version__}"
    return f"cpu|{platform.machine()}|torch{torch.__version__}"


@dataclass(frozen=True)
class EngineKey:
    """Everything a built engine depends on; `digest` names its file."""

    kind: str
    model: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    device: str
    extra: str = ""

    @classmethod
    def of(
        cls,
        kind: str,
        module: nn.Module,
        inputs: Sequence[torch.Tensor],
        device: torch.device | str | None = None,
        extra: str = "",
        model: str | None = None,
    ) -> EngineKey:
        dtypes = sorted({str(t.dtype) for t in inputs})
        return cls(
            kind=kind,
            model=model or model_hash(module),
            shapes=tuple(tuple(t.shape) for t in inputs),
            dtype=",".join(dtypes),
            device=device_tag(device),
            extra=extra,
        )

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


class EngineCache:
    """A folder of `<kind>-<digest>.<ext>` files, each with a `.json` sidecar describing its key."""

    def __init__(self, root: Path | str = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    def path(self, key: EngineKey, ext: str) -> Path:
        return self.root / f"{key.kind}-{key.digest}.{ext}"

    def get(self, key: EngineKey, ext: str) -> Path | None:
        path = self.path(key, ext)
        return path if path.is_file() else None

    def put(self, key: EngineKey, ext: str, data: bytes) -> Path:
        """Write atomically, so a crash mid-build never leaves a truncated engine to load later."""
        path = self.path(key, ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        meta = asdict(key) | {"file": path.name, "bytes": len(data), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return path

    def entries(self) -> list[dict]:
        """Sidecar records of everything cached, newest first (for `liveavatar engines list`)."""
        if not self.root.is_dir():
            return []
        metas = [json.loads(p.read_text()) for p in self.root.glob("*.json")]
        return sorted(metas, key=lambda m: m.get("created", ""), reverse=True)
