"""The `preview` backend: a CPU-only talking portrait that needs no weights (`generator`), found
(`face`), fitted (`landmarks`) and warped (`rig`) from the portrait's own pixels.

This module stays light (no OpenCV): the registry imports it to ask the settings rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from liveavatar.backends.base import Backend
from liveavatar.generator import Generator

if TYPE_CHECKING:
    from liveavatar.settings import ModelSettings


class PreviewBackend(Backend):
    name = "preview"
    uses_prompt = False
    """It animates the portrait from audio alone."""
    default_sizes = {"": "512*512"}

    def from_options(self, **options: Any) -> Generator:
        from liveavatar.backends.preview.generator import PreviewGenerator

        return PreviewGenerator(**options)

    def create(self, settings: ModelSettings, **options: Any) -> Generator:
        """The preview takes none of the model settings nor the offline tools' options."""
        return self.from_options()
