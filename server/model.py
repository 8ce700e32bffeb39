"""Build the configured backend once per GPU set, and describe it honestly.

The `liveavatar` backend is loaded here from `ServerConfig` (checkpoint folder or random weights,
steps, size, motion frames), then the accelerations the engines helper offers for a loaded DiT are
applied (`--fp8`, `--engine compile`). With several GPU sets (`--gpus N`, or `devices`) the model is
loaded once, onto the first set's device, and copied tensor by tensor onto each other set's device
(`replicate`): every replica has the same weights, so a session's frames do not depend on the set it
lands on; the accelerations and the warm-up are then applied to each replica. What is asked for but
not applied as asked (FP8 emulated on a CPU) is logged and listed in `ModelInfo.notes`, which the
client shows next to the backend, together with a "random weights" marker: a stream from random
weights must never pass for the model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liveavatar.generator import Generator
from server.config import ConfigError, ServerConfig

log = logging.getLogger(__name__)

CKPT_SUBDIR = "Wan2.2-S2V-14B"
LORA_FILE = Path("LiveAvatar") / "liveavatar.safetensors"


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
    realtime: dict[str, Any] | None = None
    """`RealtimePlan.to_message()` from the start-up measurement (None: not measured, no warm-up)."""

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


def resolve_checkpoint(folder: str, lora: str = "") -> tuple[Path, Path | None]:
    """`--ckpt-dir` may name the Wan2.2-S2V-14B folder itself or its parent (the Docker /models
    layout, with LiveAvatar/ beside it); the LoRA defaults to LiveAvatar/liveavatar.safetensors."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"checkpoint folder {root} does not exist")
    ckpt = root / CKPT_SUBDIR if (root / CKPT_SUBDIR).is_dir() else root
    lora_path: Path | None
    if lora:
        lora_path = Path(lora).expanduser()
        if not lora_path.is_file():
            raise ConfigError(f"LoRA file {lora_path} does not exist")
    else:
        lora_path = next((p for p in (root / LORA_FILE, ckpt.parent / LORA_FILE) if p.is_file()), None)
    return ckpt, lora_path


def resolve_devices(config: ServerConfig) -> list[str]:
    """The device of each GPU set, in order: `devices` as configured; `cuda:0` .. `cuda:N-1` for
    `gpus` N > 1; otherwise the one set of a single-GPU server (`cuda` if there is one, else `cpu`).
    With `gpus_per_session` K > 1 the devices are grouped K by K into pipelined sets, each named by
    its devices joined with `+` (`cuda:0+cuda:1`). The preview backend always has one set, on the CPU.
    Raises ConfigError for GPUs that are not there."""
    flat = _resolve_flat_devices(config)
    k = config.gpus_per_session
    if k <= 1:
        return flat
    return [SET_JOIN.join(flat[i : i + k]) for i in range(0, len(flat), k)]


SET_JOIN = "+"
"""Joins the devices of a pipelined GPU set in its name (`cuda:0+cuda:1`)."""


def set_devices(device: str) -> list[str]:
    """The devices of a GPU set's name (`cuda:0+cuda:1` -> [cuda:0, cuda:1]; `cuda:0` -> [cuda:0])."""
    return device.split(SET_JOIN)


def _resolve_flat_devices(config: ServerConfig) -> list[str]:
    if config.backend != "liveavatar":
        return ["cpu"]
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = f"{visible} CUDA device{'' if visible == 1 else 's'} {'is' if visible == 1 else 'are'} visible"
    if config.devices:
        for device in config.devices:
            if device.startswith("cuda") and torch.device(device).index >= visible:
                raise ConfigError(f"devices names {device}, but {seen}")
        return list(config.devices)
    if config.gpus > 1:
        if config.gpus > visible:
            hint = "" if visible else " (no CUDA here; --devices cpu,cpu builds GPU sets on the CPU for tests)"
            raise ConfigError(f"--gpus {config.gpus} needs {config.gpus} CUDA devices, but {seen}{hint}")
        return [f"cuda:{i}" for i in range(config.gpus)]
    return ["cuda" if visible else "cpu"]


def on_device(device: str | None) -> contextlib.AbstractContextManager[Any]:
    """Make `cuda:N` the calling thread's current CUDA device for the block (nothing for cpu / cuda):
    code that allocates on "the" GPU, synchronizes or times kernels then works on the set's own GPU."""
    if device is None or not device.startswith("cuda:") or SET_JOIN in device:
        return contextlib.nullcontext()  # a pipelined set's devices belong to its rank processes
    import torch

    return torch.cuda.device(torch.device(device))


def build_generators(config: ServerConfig) -> tuple[list[Generator], ModelInfo]:
    """One generator per GPU set (`resolve_devices`), ready to serve; raises ConfigError for unusable
    settings. The preview backend gets one."""
    from liveavatar.backends import create_generator

    devices = resolve_devices(config)
    if config.backend != "liveavatar":
        return [create_generator(config.backend)], ModelInfo(weights="none", device="cpu", devices=devices)
    device = devices[0]
    info = ModelInfo(sample_steps=config.sample_steps, device=device, devices=devices)
    if config.cuda_graphs and not device.startswith("cuda"):
        info.notes.append("cuda_graphs ignored: no CUDA device")
    options: dict[str, Any] = {
        "sample_steps": config.sample_steps,
        "motion_frames": config.motion_frames,
        "size": config.size or None,
        "device": device,
        "cuda_graphs": config.cuda_graphs,
    }
    if config.random_weights:
        if config.checkpoints:
            info.notes.append(f"checkpoint folder {config.checkpoints} ignored: random weights asked for")
        options["random_weights"] = config.random_weights
        info.weights = f"random:{config.random_weights}"
        log.warning("RANDOM WEIGHTS (%s): the avatar is noise, for tests and benchmarks only", config.random_weights)
    else:
        ckpt, lora = resolve_checkpoint(config.checkpoints, config.lora)
        options.update(ckpt_dir=str(ckpt), lora_path=str(lora) if lora else None)
        options["text_device"] = "cpu"  # umT5 runs once per prompt; keep its 11 GB off the GPU
        info.weights = "checkpoint"
        if lora is None:
            info.notes.append("no LiveAvatar LoRA found: the base model is not distilled for 4 steps")
        log.info("loading %s (LoRA %s) on %s", ckpt, lora or "none", device)
    if config.gpus_per_session > 1:
        return _build_pipelined(config, devices, options, info)
    try:
        with on_device(device):
            generators = [create_generator("liveavatar", **options)]
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"cannot build the liveavatar backend: {exc}") from None
    for other in devices[1:]:
        with on_device(other):
            generators.append(replicate(generators[0], other))
        log.info("GPU set %d: the model copied onto %s", len(generators) - 1, other)
    for index, (generator, where) in enumerate(zip(generators, devices, strict=True)):
        with on_device(where):
            _accelerate(generator, config, info, where, first=index == 0)
    from liveavatar.acceleration.accelerate import choose_attention

    first: Any = generators[0]  # the liveavatar generator, past the interface (as in replicate)
    size = first.default_size
    with on_device(device):  # the kernel choice is process-wide: made once, on the first set's GPU
        info.attention = choose_attention(first.pipeline.dit, size.height // 8, size.width // 8)
    log.info("attention kernel: %s (fastest exact for %s)", info.attention, size)
    if info.engine.startswith("compile"):
        for index, (generator, where) in enumerate(zip(generators, devices, strict=True)):
            with on_device(where):
                profile = warm_up(generator)
            if index == 0 and profile:
                info.realtime = realtime_from_profile(profile, generator, config)
    for note in info.notes:
        log.warning("%s", note)
    return generators, info


PIPELINED_WARM_UP_BLOCKS = 7
"""A pipelined set's warm-up: the shapes (blocks 1..7, docs of `warm_up`) without the steady blocks,
which `measure_pipeline` then runs with blocks in flight."""


def _build_pipelined(
    config: ServerConfig, sets: list[str], options: dict[str, Any], info: ModelInfo
) -> tuple[list[Generator], ModelInfo]:
    """One `PipelinedGenerator` per set of `gpus_per_session` devices, all started at once (each loads
    the model in its own rank processes), then warmed up and measured one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from liveavatar.backends.liveavatar.pipelined import PipelinedGenerator

    options = {k: v for k, v in options.items() if k not in ("device", "cuda_graphs")}
    log.info("%d pipelined GPU set(s) of %d devices: %s", len(sets), config.gpus_per_session, ", ".join(sets))

    def start(name: str) -> PipelinedGenerator:
        return PipelinedGenerator(set_devices(name), options, engine=config.engine, fp8=config.fp8)

    with ThreadPoolExecutor(len(sets)) as pool:
        futures = [pool.submit(start, name) for name in sets]
        generators: list[Generator] = []
        failure: BaseException | None = None
        for future in futures:
            try:
                generators.append(future.result())
            except BaseException as exc:  # keep the others to shut them down
                failure = failure or exc
    if failure is not None:
        for generator in generators:
            generator.shutdown()
        if isinstance(failure, ValueError):
            raise ConfigError(f"cannot build the liveavatar backend: {failure}") from None
        raise failure
    first = generators[0]
    info.engine, info.fp8, info.attention = first.engine, config.fp8, first.attention
    info.notes += first.notes
    if config.engine == "compile":
        for index, generator in enumerate(generators):
            warm_up(generator, blocks=PIPELINED_WARM_UP_BLOCKS)
            interval = measure_pipeline(generator)
            if index == 0:
                info.realtime = realtime_from_interval(interval, generator)
    return generators, info


def replicate(generator: Any, device: str) -> Generator:
    """A second `LiveAvatarGenerator` like `generator` (same settings) whose models sit on `device`.

    The weights are copied tensor by tensor from `generator`'s (device to device; nothing is read from
    disk again), so every replica computes the same frames. A text encoder kept on the CPU (umT5 with a
    checkpoint, 11 GB) is shared, one prompt at a time, instead of copied. Call before `_accelerate`."""
    from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator
    from liveavatar.models.loading import Pipeline

    pipe = generator.pipeline
    text = pipe.text_encoder
    if text.device.type == "cpu":
        if not isinstance(text, SharedTextEncoder):
            text = pipe.text_encoder = SharedTextEncoder(text)
    else:
        text = _copy_to(text, text.model, device)
    replica = Pipeline(
        dit=_copy_to(pipe.dit, pipe.dit, device),
        vae=_copy_to(pipe.vae, pipe.vae.model, device),
        text_encoder=text,
        audio=_copy_to(pipe.audio, pipe.audio.model, device),
    )
    return LiveAvatarGenerator(
        replica,
        sample_steps=generator.dit.sample_steps,
        guide_scale=generator.dit.guide_scale,
        default_size=generator.default_size,
        cache_entries=generator.cache_entries,
        motion_frames=generator.motion_frames,
        offload_model=generator.offload_model,
        cuda_graphs=generator.dit.cuda_graphs,
    )


def _copy_to(obj: Any, module: Any, device: str) -> Any:
    """A deep copy of `obj` in which every parameter and buffer of `module` (an nn.Module inside it) is
    a copy on `device`, made straight from the original (no second copy on the original's device)."""
    from torch import nn

    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.to(device, copy=True)
    return copy.deepcopy(obj, memo)


class SharedTextEncoder:
    """One CPU text encoder for every GPU set's generator: prompts are encoded one at a time (the
    tokenizer is not safe to call from two threads at once)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def encode_prompt(self, prompt: str) -> Any:
        with self._lock:
            return self.inner.encode_prompt(prompt)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _accelerate(generator: Any, config: ServerConfig, info: ModelInfo, device: str, first: bool = True) -> None:
    """`--fp8` and `--engine compile` on one generator (`liveavatar.acceleration.accelerate.accelerate`); `first`: the
    first set's (process-wide parts and notes happen once)."""
    from liveavatar.acceleration.accelerate import accelerate

    engine, notes = accelerate(generator, config.engine, config.fp8, first=first)
    info.fp8 = info.fp8 or config.fp8
    if info.engine != "compile+rope+vae":
        info.engine = engine
    info.notes += notes


_WARM_UP_STAGES = {
    1: "compiling the DiT blocks, RoPE and the VAE decoder, or loading them from the compile cache",
    2: "KV window of 6 frames", 3: "KV window of 9 frames", 4: "full KV window",
    5: "adaptive-sink prefill",
}  # fmt: skip
"""What each warm-up block compiles, for the start-up log."""


def warm_up(generator: Any, blocks: int = 10) -> list[Any]:
    """Run a throw-away session at the default size before serving, so torch.compile's graph capture
    and autotuning (a minute or more for the 14B DiT and the VAE) happen at start-up, not in the first
    viewer's session. Six blocks cover every shape a stream goes through: the KV window growing over
    the first clip (3, 6, 9, 12 frames), the adaptive-sink prefill at block 4, and the steady state,
    where the compiled VAE still meets new cache variants up to about block 8 (seen on an H200); the
    last three blocks measure the block costs that say whether a session keeps real time.
    Returns the steady blocks' stage profiles (empty for a backend that keeps none)."""
    import time

    import numpy as np

    from liveavatar.generator import AudioWindow, AvatarSpec
    from liveavatar.media_io import default_portrait_path, load_image

    began = time.perf_counter()
    steady: list[Any] = []
    image = load_image(default_portrait_path())
    # A second, shorter session: on an H200 the first live session after a one-session warm-up still
    # recompiled the VAE decoder for ~13 s (a fresh decoder cache takes other guard paths).
    total, done = blocks + 2, 0
    for session, n in enumerate((blocks, 2)):
        state = generator.open(AvatarSpec(image, f"warm-up {session}", seed=session), generator.default_size)
        try:
            for i in range(n):
                silence = np.zeros(generator.audio_samples_per_block, np.float32)
                block_began = time.perf_counter()
                generator.step(state, AudioWindow(silence, index=i))
                done += 1
                log.info(
                    "warm-up block %d/%d at %s: %.1f s (%s)", done, total, generator.default_size,
                    time.perf_counter() - block_began,
                    "a second session: fresh decoder cache" if session else _WARM_UP_STAGES.get(done, "steady state"),
                )  # fmt: skip
            if session == 0:  # its last blocks run the steady state: the block costs of real time
                steady = list(getattr(state, "profile", []))[-3:]  # the compiler has met every shape by then
        finally:
            generator.close(state)
    seconds = time.perf_counter() - began
    log.info("warm-up: %d + 2 blocks at %s in %.1f s (compiled kernels ready)", blocks, generator.default_size, seconds)
    return steady


def realtime_from_profile(profile: list[Any], generator: Any, config: ServerConfig) -> dict[str, Any]:
    """Whether one session keeps real time, from the warm-up's steady blocks (`BlockProfile`s); logged
    as a warning with the settings that would when it does not, and shown in `config`, `stats` and
    /metrics."""
    from server.load import plan_realtime

    # the median block of the last three (a late recompile only ever adds time); measured with no
    # session streaming, so where the step is launch-bound a live session can be slower than this
    block = sorted(profile, key=lambda p: p.total_ms)[len(profile) // 2]
    fixed = (block.audio_ms + block.vae_ms) / 1e3
    per_step = block.dit_ms / block.steps / 1e3
    size = generator.default_size
    block_s = generator.frames_per_block / generator.fps
    plan = plan_realtime(fixed, per_step, config.sample_steps, min(2, config.sample_steps), block_s, size.width, size.height)
    if plan.keeps:
        log.info("real time: one session keeps it at %d steps (%.0f ms per block)", plan.steps, plan.block_s * 1e3)
    else:
        log.warning("NOT REAL TIME: %s", plan.advice)
    return plan.to_message()


def measure_pipeline(generator: Any, blocks: int = 6) -> float:
    """The block interval of a pipelined set when full: a throw-away session submits `blocks` blocks of
    silence at once and the median gap between consecutive blocks coming back is the answer, seconds.
    Run after `warm_up` (every shape compiled)."""
    import time

    import numpy as np

    from liveavatar.generator import AudioWindow, AvatarSpec
    from liveavatar.media_io import default_portrait_path, load_image

    state = generator.open(AvatarSpec(load_image(default_portrait_path()), "pipeline measure", seed=7), generator.default_size)
    try:
        silence = np.zeros(generator.audio_samples_per_block, np.float32)
        futures = [generator.submit(state, AudioWindow(silence, index=i)) for i in range(blocks)]
        arrivals = []
        for future in futures:
            future.result(timeout=600)
            arrivals.append(time.perf_counter())
    finally:
        generator.close(state)
    gaps = sorted(b - a for a, b in zip(arrivals[1:], arrivals[2:], strict=False))  # the first one fills the pipe
    interval = gaps[len(gaps) // 2]
    log.info("pipelined set %s: one block every %.0f ms when full (%d blocks in flight)", "+".join(generator.devices),
             interval * 1e3, generator.pipeline_depth)
    return interval


def realtime_from_interval(interval_s: float, generator: Any) -> dict[str, Any]:
    """Whether one session keeps real time on a pipelined set, from its measured block interval; the
    step count is fixed there (liveavatar/backends/liveavatar/pipelined.py), so the advice is a smaller size or more GPUs."""
    from server.load import RealtimePlan

    block_s = generator.frames_per_block / generator.fps
    steps = generator.sample_steps
    if interval_s <= block_s:
        plan = RealtimePlan(True, steps, interval_s)
        log.info("real time: one session keeps it over %d GPUs (%.0f ms per block)", len(generator.devices), interval_s * 1e3)
    else:
        size = generator.default_size
        scale = (block_s / interval_s) ** 0.5
        w, h = int(size.width * scale) // 64 * 64, int(size.height * scale) // 64 * 64
        advice = (
            f"one session at {size} over {len(generator.devices)} GPUs needs {interval_s * 1000:.0f} ms per "
            f"{block_s * 1000:.0f} ms block, so it cannot keep real time here; lag stays bounded by dropping frames. "
            f"Would keep it: a size of at most {w}*{h}; --sample-steps {max(1, steps - 1)}; or more GPUs per session"
        )
        plan = RealtimePlan(False, steps, interval_s, advice)
        log.warning("NOT REAL TIME: %s", advice)
    return plan.to_message()
