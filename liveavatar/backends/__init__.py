"""The one registry of backends: `serve`, `generate`, `batch` and `bench` pick a backend by name here.

Each backend is a package of its own under `liveavatar/backends/` whose `Backend` subclass
(`liveavatar.backends.base`) builds its generators; this table names it, as `module:Class`, so a
backend's heavy imports happen only once it is chosen. Adding a backend: its folder, plus its line
in `REGISTERED` (docs/architecture.md, "Adding a backend"). Tests and plugins add theirs at run time
with `register`.
"""

from __future__ import annotations

import importlib
from typing import Any

from liveavatar.backends.base import Backend, BlockCosts, ModelInfo
from liveavatar.generator import Generator

__all__ = ["Backend", "BlockCosts", "ModelInfo", "backend", "create_generator", "names", "register"]

REGISTERED: dict[str, str | Backend] = {
    "preview": "liveavatar.backends.preview:PreviewBackend",
    "liveavatar": "liveavatar.backends.liveavatar:LiveAvatarBackend",
}
"""Backend name -> its `Backend` (`module:Class`, imported on first use, or an instance)."""


def names() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(REGISTERED)


def register(name: str, target: str | Backend) -> None:
    """Add (or replace) backend `name`: a `Backend` instance or its `module:Class`."""
    REGISTERED[name] = target


def unregister(name: str) -> None:
    REGISTERED.pop(name, None)


def backend(name: str) -> Backend:
    """The backend registered as `name`; ValueError naming the choices otherwise."""
    target = REGISTERED.get(name)
    if target is None:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(REGISTERED)}")
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = REGISTERED[name] = getattr(importlib.import_module(module), cls)()
    return target


def create_generator(name: str, **options: Any) -> Generator:
    """Build the named backend's generator from constructor-style options (tests, tools that bypass
    the settings); heavy imports happen only for the one chosen."""
    return backend(name).from_options(**options)
