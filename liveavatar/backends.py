"""Backend registry: the server and the offline tools pick a `Generator` by name."""

from __future__ import annotations

from typing import Any

from liveavatar.generator import Generator

BACKENDS = ("preview", "liveavatar")


def create_generator(name: str, **options: Any) -> Generator:
    """Build the named backend; heavy imports happen only for the one chosen."""
    if name == "preview":
        from liveavatar.preview import PreviewGenerator

        return PreviewGenerator(**options)
    if name == "liveavatar":
        from liveavatar.streaming import LiveAvatarGenerator

        return LiveAvatarGenerator.from_options(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
