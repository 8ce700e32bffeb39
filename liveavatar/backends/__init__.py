"""Backend registry: the server and the offline tools pick a `Generator` by name."""

from __future__ import annotations

from typing import Any

from liveavatar.generator import Generator

BACKENDS = ("preview", "liveavatar")
USES_PROMPT = {"preview": False, "liveavatar": True}
"""Whether a backend conditions on the text prompt (the preview animates the portrait from audio alone),
so the prompt is judged only where it matters."""


def create_generator(name: str, **options: Any) -> Generator:
    """Build the named backend; heavy imports happen only for the one chosen."""
    if name == "preview":
        from liveavatar.backends.preview.generator import PreviewGenerator

        return PreviewGenerator(**options)
    if name == "liveavatar":
        from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator

        return LiveAvatarGenerator.from_options(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
