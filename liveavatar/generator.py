"""The interface every avatar backend implements, and the small value types that cross it.

The server drives a backend one *block* at a time: it hands over one window of 16 kHz audio
(`audio_samples_per_block` samples, 0.48 s for the LiveAvatar block of 12 frames at 25 fps) and gets
back exactly `frames_per_block` RGB frames for that audio. Everything that belongs to one session
lives in the state object returned by `open()`, never on the backend, so one backend instance can
serve many sessions (and a worker can interleave them block by block, or make several sessions' blocks
in one call where the backend batches them: `max_batch`, `batch_key`, `step_batch`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
"""Audio rate of every window handed to a generator (mono)."""


@dataclass(frozen=True, eq=False)
class AvatarSpec:
    """What the avatar looks like: a reference portrait, a text prompt and a seed."""

    image: np.ndarray
    """RGB uint8 array of shape [H, W, 3]."""
    prompt: str = ""
    seed: int = 0
    face: tuple[float, float, float, float] | None = None
    """(x, y, w, h) of the face to animate in `image`'s pixels, when already known. The offline tools find
    the face on the whole portrait and carry its box through their crop, because a detector run again on a
    crop can pick something else (a crop may cut the face or keep a face-like background)."""

    def __post_init__(self) -> None:
        img = self.image
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
            raise ValueError("AvatarSpec.image must be an RGB uint8 array of shape [H, W, 3]")
        if self.face is not None and (len(self.face) != 4 or min(self.face[2:]) <= 0):
            raise ValueError("AvatarSpec.face must be (x, y, w, h) with a positive width and height")


@dataclass(frozen=True, eq=False)
class AudioWindow:
    """One block of audio, plus the audio before it that an encoder may need for context.

    `samples` is float32 in [-1, 1], exactly `audio_samples_per_block` long. `context` holds the
    samples that came right before (possibly empty at the start of a stream); backends that need a
    longer receptive field (wav2vec2) read it, the preview backend ignores it.
    """

    samples: np.ndarray
    context: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    speech: bool = False
    """True when the VAD saw speech in this window; idle windows carry (near) silence."""
    index: int = 0
    """Block number within the session's stream, starting at 0."""


SIZE_MULTIPLE, SIZE_MIN, SIZE_MAX = 16, 128, 1280
"""Every output size any command accepts (liveavatar.settings); the DiT then fits it to multiples of 64."""


@dataclass(frozen=True)
class Size:
    """Output size in pixels, written `width*height` like the original CLI."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Size:
        try:
            w, h = (int(v) for v in text.lower().replace("x", "*").split("*"))
        except ValueError:
            raise ValueError(f"size must look like 704*384 (width*height), got {text!r}") from None
        size = cls(w, h)
        size.check()
        return size

    def check(self, multiple: int = SIZE_MULTIPLE, lo: int = SIZE_MIN, hi: int = SIZE_MAX) -> None:
        for name, v in (("width", self.width), ("height", self.height)):
            if v % multiple or not lo <= v <= hi:
                raise ValueError(f"{name} {v} must be a multiple of {multiple} between {lo} and {hi}")

    def __str__(self) -> str:
        return f"{self.width}*{self.height}"


class Generator(ABC):
    """A backend that turns audio blocks into video frames for any number of sessions.

    Besides the four abstract methods, every optional ability is declared here with its default, so
    the server asks a generator what it can do instead of probing for attributes."""

    name: str = "generator"
    fps: int = 25
    frames_per_block: int = 12
    """Video frames per block (the LiveAvatar DiT makes them from 3 latent frames)."""
    sample_rate: int = SAMPLE_RATE
    default_size: Size = Size(512, 512)
    """The size a session gets when none is configured."""
    failure: str | None = None
    """Why the backend can serve nothing more (a rank of its GPU set died); None while it is healthy."""
    pipeline_depth: int = 1
    """Blocks of one session the backend works on at once. 1: `step` makes a block start to end;
    more: the backend pipelines blocks over several devices and the server calls `submit`, keeping one
    block more than this in flight, queued at the pipeline's start (liveavatar.backends.liveavatar.pipelined)."""
    sample_steps: int = 0
    """Denoising steps per block at full quality (0: not a diffusion backend)."""
    step_control: bool = False
    """Whether `set_sample_steps` changes a session's steps, so the server may degrade it under load."""
    worker_threads: int = 1
    """Threads the server should run `step` on per GPU set (`--workers` overrides it)."""
    cpu_bound: bool = False
    """True: sessions cost CPU cores, not GPU time, so the server admits them against its CPU budget."""
    defers_decode: bool = False
    """Whether `step_latents` and `decode_latents` split `step`, so an offline render may make every
    block's latents first and decode them after (all of one stage, then all of the other)."""
    max_batch: int = 1
    """The most sessions whose next blocks `step_batch` makes in one call, faster than one by one
    (1: never; the server's worker then calls `step` only)."""

    @property
    def audio_samples_per_block(self) -> int:
        return self.sample_rate * self.frames_per_block // self.fps

    @abstractmethod
    def open(self, spec: AvatarSpec, size: Size) -> Any:
        """Create the per-session state (caches, RNG, ...) for this avatar at this size."""

    @abstractmethod
    def step(self, state: Any, window: AudioWindow) -> np.ndarray:
        """Generate the next block: uint8 frames of shape [frames_per_block, H, W, 3]."""

    @abstractmethod
    def switch(self, state: Any, spec: AvatarSpec) -> None:
        """Change portrait and/or prompt; takes effect at the next `step` (a block boundary)."""

    def poster(self, state: Any) -> np.ndarray | None:
        """The still a new stream shows until its first block is out (None: black), so a viewer sees the
        avatar, framed as generation frames it, rather than a black screen while the first block runs."""
        return None

    def close(self, state: Any) -> None:  # noqa: B027 - optional hook, most backends free by GC
        """Release what the session holds (GPU memory, caches)."""

    def submit(self, state: Any, window: AudioWindow) -> Any:
        """Start the next block without waiting: a `concurrent.futures.Future` of a result with
        `frames` (as `step` returns them) and `busy_s` (the block's share of the backend's time).
        Only backends with `pipeline_depth` > 1 have it; raises NotImplementedError otherwise."""
        raise NotImplementedError(f"the {self.name} backend makes blocks with step(), not submit()")

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop what the backend runs besides its models (processes, threads); the server calls it once
        at exit, after every session closed."""

    def prepare(self, spec: AvatarSpec, size: Size) -> None:  # noqa: B027 - optional hook
        """Do the per-avatar work (encodings) ahead of `open`/`switch`, on the caller's thread, so the
        thread that runs `step` for every session is not held up by one session's new avatar."""

    def set_sample_steps(self, state: Any, steps: int | None) -> int:
        """Run `steps` (1..sample_steps) denoising steps per block from the next block on; None restores
        the full count. Returns the count in use (0 here: no step control, see `step_control`)."""
        return 0

    def session_nbytes(self, size: Size) -> int:
        """Memory one session at `size` will hold once running, for admission (0: nothing worth counting)."""
        return 0

    def memory_allocated(self) -> int | None:
        """Bytes that tensors hold now on the generator's GPUs, summed (torch's `memory_allocated`: the
        caching allocator's books), or None where it keeps nothing on a GPU. What the caching allocator
        keeps free, CUDA contexts and NCCL buffers are not counted: this is the figure that shows a leak."""
        return None

    def state_nbytes(self, state: Any) -> int:
        """Memory `state` holds now (0: nothing worth counting). May raise RuntimeError while a worker
        thread changes the state; ask again later."""
        return 0

    def block_profiles(self, state: Any) -> list[Any]:
        """Where the session's last blocks' time went, oldest first (empty for a backend that keeps none)."""
        return []

    def batch_key(self, state: Any, window: AudioWindow) -> Hashable | None:
        """Sessions whose next blocks have equal keys (not None) may go through one `step_batch` call;
        None: this block runs alone. Asked on the thread that runs `step`, between the session's calls."""
        return None

    def step_batch(self, items: Sequence[tuple[Any, AudioWindow]]) -> list[np.ndarray | Exception]:
        """The next block of several sessions (`(state, window)` each, equal `batch_key`s): per item its
        frames as `step` returns them, or the exception that item failed with, so one session's failure
        is not the others'. This default makes them one at a time."""
        results: list[np.ndarray | Exception] = []
        for state, window in items:
            try:
                results.append(self.step(state, window))
            except Exception as exc:  # handed back as this item's result
                results.append(exc)
        return results

    def step_latents(self, state: Any, window: AudioWindow) -> Any:
        """The first half of `step` (see `defers_decode`): the block's latents, not yet decoded."""
        raise NotImplementedError(f"the {self.name} backend does not split its blocks")

    def decode_latents(self, state: Any, latents: Any) -> np.ndarray:
        """The second half of `step`: `step_latents`' result -> frames, in the order they were made."""
        raise NotImplementedError(f"the {self.name} backend does not split its blocks")
