"""The `liveavatar` backend: the diffusion model as a block-by-block generator on one device
(`generator`) or over the GPUs of one set (`pipelined`); built, replicated onto each GPU set and
accelerated by `build`, warmed up and measured by `warmup`.

This module stays light (no torch): the registry imports it to ask the settings rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from liveavatar.backends.base import Backend, ModelInfo
from liveavatar.generator import Generator, Size

if TYPE_CHECKING:
    from liveavatar.settings import ModelSettings


class LiveAvatarBackend(Backend):
    name = "liveavatar"
    uses_prompt = True
    takes_weights = True
    runs_on_gpu = True
    max_gpus_per_session = 8
    cuda_graphs = True
    default_sizes = {"": "704*384", "14b": "704*384", "tiny": "128*128"}
    """The tiny random model is for CPU tests: seconds, not minutes."""

    def fit_size(self, size: Size) -> Size:
        """The DiT makes multiples of 64 only, so any other size is an area limit fitted to its own
        aspect ratio, as in the original CLI (688*368 -> 640*384)."""
        from liveavatar.models.config import output_size

        width, height = output_size(str(size))
        return Size(width, height)

    def check(self, settings: ModelSettings) -> None:
        if not (settings.ckpt_dir or settings.random_weights):
            raise ValueError(
                "the liveavatar backend needs --ckpt-dir (the downloaded checkpoints) or --random-weights tiny|14b; "
                "or use --backend preview"
            )

    def from_options(self, **options: Any) -> Generator:
        from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator

        return LiveAvatarGenerator.from_options(**options)

    def create(self, settings: ModelSettings, **options: Any) -> Generator:
        """One generator on the default device with `settings`' weights, steps, motion frames, engine
        and FP8; `options`: `LiveAvatarGenerator.from_options` keywords (`guide_scale`, `offload_model`)."""
        from liveavatar.backends.liveavatar.build import create

        return create(settings, **options)

    def build(self, settings: ModelSettings, devices: list[str]) -> tuple[list[Generator], ModelInfo]:
        from liveavatar.backends.liveavatar.build import build

        return build(settings, devices)
