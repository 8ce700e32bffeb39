"""A backend slower than real time, for the overload tests: the preview's frames, made late.

Each block takes `base_s + per_step_s x steps` of sleep on the worker thread (the sleep releases the
GIL, as a GPU wait does), so the server's step governor can bring it back towards real time by
lowering the steps, exactly as with the diffusion backend. Like that backend it has step control
(`sample_steps`, `set_sample_steps`); unlike the preview it runs one worker thread and is not
admitted against the CPU budget.

It is also the proof that a backend is one folder plus one registry line: `SlowBackend` is all the
server needs, registered by name (`register_slow_backend`), so a server starts with `backend="slow"`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from liveavatar.backends import Backend, register
from liveavatar.backends.preview.generator import PreviewGenerator
from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size


@dataclass(eq=False)
class SlowState:
    inner: Any
    steps: int | None = None
    blocks: int = 0


class SlowGenerator(PreviewGenerator):
    """The preview backend, `base_s + per_step_s x steps` seconds per block (4 steps by default)."""

    name = "slow"
    worker_threads = 1
    cpu_bound = False
    step_control = True

    def __init__(self, base_s: float = 0.12, per_step_s: float = 0.15, sample_steps: int = 4) -> None:
        super().__init__()
        self.base_s, self.per_step_s = base_s, per_step_s
        self.sample_steps = sample_steps
        self.steps_run: list[int] = []

    def block_seconds(self, steps: int | None = None) -> float:
        return self.base_s + self.per_step_s * (steps or self.sample_steps)

    def open(self, spec: AvatarSpec, size: Size) -> SlowState:
        return SlowState(super().open(spec, size))

    def poster(self, state: SlowState) -> np.ndarray:
        return super().poster(state.inner)

    def switch(self, state: SlowState, spec: AvatarSpec) -> None:
        super().switch(state.inner, spec)

    def set_sample_steps(self, state: SlowState, steps: int | None) -> int:
        full = self.sample_steps
        state.steps = None if steps is None else max(1, min(full, int(steps)))
        return state.steps or full

    def step(self, state: SlowState, window: AudioWindow) -> np.ndarray:
        steps = state.steps or self.sample_steps
        time.sleep(self.block_seconds(steps))
        self.steps_run.append(steps)
        state.blocks += 1
        return super().step(state.inner, window)


class SlowBackend(Backend):
    """Builds one `SlowGenerator` with the timings it was made with; `built` keeps what it built."""

    name = "slow"
    uses_prompt = False

    def __init__(self, base_s: float = 0.12, per_step_s: float = 0.15, sample_steps: int = 4) -> None:
        self.timings = {"base_s": base_s, "per_step_s": per_step_s, "sample_steps": sample_steps}
        self.built: list[SlowGenerator] = []

    def from_options(self, **options: Any) -> Generator:
        generator = SlowGenerator(**(self.timings | options))
        self.built.append(generator)
        return generator

    def create(self, settings: Any, **options: Any) -> Generator:
        return self.from_options()


def register_slow_backend(**timings: float) -> SlowBackend:
    """Register `slow` (the one line a real backend adds to `liveavatar.backends.REGISTERED`)."""
    backend = SlowBackend(**timings)  # type: ignore[arg-type]
    register("slow", backend)
    return backend
