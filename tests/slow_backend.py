"""A backend slower than real time, for the overload tests: the preview's frames, made late.

Each block takes `base_s + per_step_s x steps` of sleep on the worker thread (the sleep releases the
GIL, as a GPU wait does), so the server's step governor can bring it back towards real time by
lowering the steps, exactly as with the diffusion backend. Like that backend it exposes the step
count the governor reads (`dit.sample_steps`) and `set_sample_steps`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from liveavatar.backends.preview.generator import PreviewGenerator
from liveavatar.generator import AudioWindow, AvatarSpec, Size


@dataclass(eq=False)
class SlowState:
    inner: Any
    steps: int | None = None
    blocks: int = 0


class SlowGenerator(PreviewGenerator):
    """The preview backend, `base_s + per_step_s x steps` seconds per block (4 steps by default)."""

    name = "slow"

    def __init__(self, base_s: float = 0.12, per_step_s: float = 0.15, sample_steps: int = 4) -> None:
        super().__init__()
        self.base_s, self.per_step_s = base_s, per_step_s
        self.dit = SimpleNamespace(sample_steps=sample_steps)
        self.steps_run: list[int] = []

    def block_seconds(self, steps: int | None = None) -> float:
        return self.base_s + self.per_step_s * (steps or self.dit.sample_steps)

    def open(self, spec: AvatarSpec, size: Size) -> SlowState:
        return SlowState(super().open(spec, size))

    def poster(self, state: SlowState) -> np.ndarray:
        return super().poster(state.inner)

    def switch(self, state: SlowState, spec: AvatarSpec) -> None:
        super().switch(state.inner, spec)

    def set_sample_steps(self, state: SlowState, steps: int | None) -> int:
        full = self.dit.sample_steps
        state.steps = None if steps is None else max(1, min(full, int(steps)))
        return state.steps or full

    def step(self, state: SlowState, window: AudioWindow) -> np.ndarray:
        steps = state.steps or self.dit.sample_steps
        time.sleep(self.block_seconds(steps))
        self.steps_run.append(steps)
        state.blocks += 1
        return super().step(state.inner, window)
