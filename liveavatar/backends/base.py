"""What a backend is besides its `Generator`: how it is built, what it reports, and the settings rules it owns.

A `Backend` is the factory of one backend package. The server hands it the validated model settings and
the devices of each GPU set it placed (`build`); the backend loads itself, replicates itself onto every
set, accelerates and warms itself up, and answers with one `Generator` per set and a `ModelInfo` that
says what actually runs. The offline tools ask for one generator (`create`). Settings validation asks
it for its default size, the sizes it can make and whether it has what it needs (`default_size`,
`fit_size`, `check`). None of these need the backend's heavy imports: the registry
(`liveavatar.backends`) imports a backend package to ask, and the package imports torch, models and
weights only inside `create` and `build`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from liveavatar.generator import Generator, Size

if TYPE_CHECKING:
    from liveavatar.settings import ModelSettings


@dataclass(frozen=True)
class BlockCosts:
    """What one block of one session costs on a GPU set, measured at start-up with no session streaming,
    for the server's real-time plan (`server/load.py`)."""

    size: Size
    """The size measured at (the backend's default)."""
    steps: int
    """The denoising steps the blocks ran."""
    fixed_s: float = 0.0
    """Per block whatever the steps (audio features + VAE decode)."""
    per_step_s: float = 0.0
    """Per denoising step."""
    interval_s: float | None = None
    """A pipelined set: one block every `interval_s` when full; its step count is fixed."""
    gpus: int = 1
    """GPUs one session spans."""


@dataclass
class ModelInfo:
    """What the server actually runs, for the log, the `config` message and /metrics."""

    weights: str = "none"
    """`checkpoint`, `random:tiny`, `random:14b`, or `none` (preview)."""
    engine: str = "eager"
    fp8: bool = False
    attention: str = "sdpa"
    sample_steps: int = 0
    device: str = "cpu"
    """The first GPU set's device."""
    devices: list[str] = field(default_factory=list)
    """Every GPU set's device, in set order (empty: just `device`)."""
    notes: list[str] = field(default_factory=list)
    """What was asked for but not applied as asked (FP8 emulated on a CPU, ...): shown next to the backend."""
    costs: BlockCosts | None = None
    """The first set's block costs from the warm-up (None: not measured)."""
    realtime: dict[str, Any] | None = None
    """`RealtimePlan.to_message()` the server made from `costs` (None: not measured, no warm-up)."""

    def to_message(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "engine": self.engine,
            "fp8": self.fp8,
            "attention": self.attention,
            "sampleSteps": self.sample_steps,
            "device": self.device,
            "devices": self.devices or [self.device],
            "notes": self.notes,
            "realtime": self.realtime,
        }


class Backend:
    """The factory of one backend, registered by name in `liveavatar.backends`. Class attributes say
    what the server may ask of it; the defaults are those of a CPU backend that needs no weights."""

    name: str = "backend"
    uses_prompt: bool = True
    """Whether it conditions on the text prompt (so the prompt is judged only where it matters)."""
    takes_weights: bool = False
    """Whether it loads weights (`--ckpt-dir`, `--lora`, `--random-weights`); others ignore those flags."""
    runs_on_gpu: bool = False
    """True: it runs on GPU sets (`--gpus`, `--devices`); False: one set, on the CPU."""
    max_gpus_per_session: int = 1
    """The most GPUs one session's blocks may flow through (`--gpus-per-session`)."""
    cuda_graphs: bool = False
    """Whether it can replay steady-state forwards from CUDA graphs (`--cuda-graphs`)."""
    default_sizes: dict[str, str] = {"": "512*512"}
    """Default output size by `random_weights` ("" for real weights or none)."""

    def default_size(self, settings: ModelSettings) -> str:
        """The size made when none is asked for."""
        return self.default_sizes.get(settings.random_weights, self.default_sizes[""])

    def fit_size(self, size: Size) -> Size:
        """The size it makes for `size` (a checked `W*H`); raises ValueError when it cannot make one."""
        return size

    def check(self, settings: ModelSettings) -> None:
        """Raise ValueError (one line naming the flag) for settings it cannot work with."""

    def create(self, settings: ModelSettings, **options: Any) -> Generator:
        """One generator on the default device, for the offline tools; `options`: their own
        (`guide_scale`, `offload_model`, ...), each backend takes what it knows."""
        raise NotImplementedError

    def build(self, settings: ModelSettings, devices: list[str]) -> tuple[list[Generator], ModelInfo]:
        """One generator per GPU set, ready to serve: `devices[i]` names set i's device (`cuda:0`,
        `cpu`, or `cuda:0+cuda:1` for a set of `settings.gpus_per_session` GPUs). Raises ValueError
        for settings that cannot work here."""
        return [self.create(settings)], ModelInfo(device=devices[0], devices=list(devices))

    def from_options(self, **options: Any) -> Generator:
        """A generator from its constructor's own keywords (tests, tools that bypass the settings)."""
        raise NotImplementedError


SET_JOIN = "+"
"""Joins the devices of a pipelined GPU set in its name (`cuda:0+cuda:1`)."""


def set_devices(device: str) -> list[str]:
    """The devices of a GPU set's name (`cuda:0+cuda:1` -> [cuda:0, cuda:1]; `cuda:0` -> [cuda:0])."""
    return device.split(SET_JOIN)


def on_device(device: str | None) -> contextlib.AbstractContextManager[Any]:
    """Make `cuda:N` the calling thread's current CUDA device for the block (nothing for cpu / cuda):
    code that allocates on "the" GPU, synchronizes or times kernels then works on the set's own GPU."""
    if device is None or not device.startswith("cuda:") or SET_JOIN in device:
        return contextlib.nullcontext()  # a pipelined set's devices belong to its rank processes
    import torch

    return torch.cuda.device(torch.device(device))
