"""Named generation modes from the Live Avatar documentation; any explicit flag overrides them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from liveavatar.settings import DEFAULT_SAMPLE_STEPS, DEFAULT_SEED


@dataclass(frozen=True)
class Preset:
    description: str
    settings: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "quick preview: 384*256, 3 steps, 32 frames per clip",
        {"size": "384*256", "sample_steps": 3, "infer_frames": 32},
    ),
    "standard": Preset(
        "standard: 688*368, 4 steps, online decode",
        {"size": "688*368", "sample_steps": 4, "enable_online_decode": True},
    ),
    "high": Preset(
        "high quality: 704*384, 5 steps, online decode",
        {"size": "704*384", "sample_steps": 5, "enable_online_decode": True},
    ),
}

DEFAULTS: dict[str, Any] = {
    "size": None,  # the backend's own (liveavatar.settings.default_size)
    "infer_frames": 48,
    "sample_steps": DEFAULT_SAMPLE_STEPS,
    "sample_guide_scale": 0.0,
    "seed": DEFAULT_SEED,
    "enable_online_decode": False,
    "offload_model": False,
    "num_clip": None,
}
"""Used when neither a flag nor the preset says otherwise (the distilled model needs no guidance)."""


def resolve(explicit: dict[str, Any], preset: str | None) -> dict[str, Any]:
    """Merge built-in defaults < preset < flags the user actually gave (those not None)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = dict(DEFAULTS)
    if preset:
        settings.update(PRESETS[preset].settings)
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return settings
