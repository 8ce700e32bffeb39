"""Build the `liveavatar` backend once per GPU set, and describe it honestly.

The model is loaded from the settings (checkpoint folder or random weights, steps, size, motion frames),
then the accelerations the engines offer for a loaded DiT are applied (`--fp8`, `--engine compile`,
`liveavatar.acceleration.accelerate`). With several GPU sets the model is loaded once, onto the first
set's device, and copied tensor by tensor onto each other set's device (`replicate`): every replica has
the same weights, so a session's frames do not depend on the set it lands on; the accelerations and the
warm-up are then applied to each replica. With `gpus_per_session` N > 1 each set is N GPUs running one
`PipelinedGenerator` (its own rank processes). What is asked for but not applied as asked (FP8 emulated
on a CPU) is logged and listed in `ModelInfo.notes`, which the client shows next to the backend,
together with a "random weights" marker: a stream from random weights must never pass for the model.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from liveavatar.backends.base import BlockCosts, ModelInfo, on_device, set_devices
from liveavatar.backends.liveavatar.warmup import (
    PIPELINED_WARM_UP_BLOCKS,
    measure_pipeline,
    steady_costs,
    warm_up,
)
from liveavatar.generator import Generator

if TYPE_CHECKING:
    from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator
    from liveavatar.settings import ModelSettings

log = logging.getLogger(__name__)

CKPT_SUBDIR = "Wan2.2-S2V-14B"
LORA_FILE = Path("LiveAvatar") / "liveavatar.safetensors"


def resolve_checkpoint(folder: str, lora: str = "") -> tuple[Path, Path | None]:
    """`--ckpt-dir` may name the Wan2.2-S2V-14B folder itself or its parent (the Docker /models
    layout, with LiveAvatar/ beside it); the LoRA defaults to LiveAvatar/liveavatar.safetensors.
    Raises ValueError for a folder or LoRA file that is not there."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"checkpoint folder {root} does not exist")
    ckpt = root / CKPT_SUBDIR if (root / CKPT_SUBDIR).is_dir() else root
    lora_path: Path | None
    if lora:
        lora_path = Path(lora).expanduser()
        if not lora_path.is_file():
            raise ValueError(f"LoRA file {lora_path} does not exist")
    else:
        lora_path = next((p for p in (root / LORA_FILE, ckpt.parent / LORA_FILE) if p.is_file()), None)
    return ckpt, lora_path


def create(settings: ModelSettings, **options: Any) -> Generator:
    """One generator on the default device, accelerated as `settings` ask (the offline tools)."""
    from liveavatar.acceleration.accelerate import accelerate
    from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator

    generator = LiveAvatarGenerator.from_options(
        ckpt_dir=settings.ckpt_dir or None, lora_path=settings.lora or None,
        random_weights=settings.random_weights or None, sample_steps=settings.sample_steps,
        motion_frames=settings.motion_frames, seed=settings.seed, **options,
    )  # fmt: skip
    if settings.engine != "eager" or settings.fp8:
        _, notes = accelerate(generator, settings.engine, settings.fp8)
        for note in notes:
            log.warning("%s", note)
    return generator


def build(settings: ModelSettings, devices: list[str]) -> tuple[list[Generator], ModelInfo]:
    """One generator per GPU set (`devices`: each set's device), ready to serve; ValueError for
    settings that cannot work here."""
    device = devices[0]
    info = ModelInfo(sample_steps=settings.sample_steps, device=device, devices=list(devices))
    if settings.cuda_graphs and not device.startswith("cuda"):
        info.notes.append("cuda_graphs ignored: no CUDA device")
    if settings.batch_sessions and not device.startswith("cuda"):
        info.notes.append("batch_sessions ignored: no CUDA device")
    options: dict[str, Any] = {
        "sample_steps": settings.sample_steps,
        "motion_frames": settings.motion_frames,
        "size": settings.size or None,
        "device": device,
        "cuda_graphs": settings.cuda_graphs,
        "batch_sessions": 2 if settings.batch_sessions else 1,
    }
    if settings.random_weights:
        if settings.ckpt_dir:
            info.notes.append(f"checkpoint folder {settings.ckpt_dir} ignored: random weights asked for")
        options["random_weights"] = settings.random_weights
        info.weights = f"random:{settings.random_weights}"
        log.warning("RANDOM WEIGHTS (%s): the avatar is noise, for tests and benchmarks only", settings.random_weights)
    else:
        ckpt, lora = resolve_checkpoint(settings.ckpt_dir, settings.lora)
        options.update(ckpt_dir=str(ckpt), lora_path=str(lora) if lora else None)
        options["text_device"] = "cpu"  # umT5 runs once per prompt; keep its 11 GB off the GPU
        info.weights = "checkpoint"
        if lora is None:
            info.notes.append("no LiveAvatar LoRA found: the base model is not distilled for 4 steps")
        log.info("loading %s (LoRA %s) on %s", ckpt, lora or "none", device)
    if settings.gpus_per_session > 1:
        return _build_pipelined(settings, devices, options, info)
    from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator

    try:
        with on_device(device):
            generators = [LiveAvatarGenerator.from_options(**options)]
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"cannot build the liveavatar backend: {exc}") from None
    for other in devices[1:]:
        with on_device(other):
            generators.append(replicate(generators[0], other))
        log.info("GPU set %d: the model copied onto %s", len(generators) - 1, other)
    for index, (generator, where) in enumerate(zip(generators, devices, strict=True)):
        with on_device(where):
            _accelerate(generator, settings, info, first=index == 0)
    from liveavatar.acceleration.accelerate import choose_attention

    first = generators[0]
    size = first.default_size
    with on_device(device):  # the kernel choice is process-wide: made once, on the first set's GPU
        info.attention = choose_attention(first.pipeline.dit, size.height // 8, size.width // 8)
    log.info("attention kernel: %s (fastest exact for %s)", info.attention, size)
    if info.engine.startswith("compile"):
        for index, (generator, where) in enumerate(zip(generators, devices, strict=True)):
            with on_device(where):
                profile = warm_up(generator)
            if index == 0 and profile:
                info.costs = steady_costs(profile, generator)
    for note in info.notes:
        log.warning("%s", note)
    return list(generators), info


def _build_pipelined(
    settings: ModelSettings, sets: list[str], options: dict[str, Any], info: ModelInfo
) -> tuple[list[Generator], ModelInfo]:
    """One `PipelinedGenerator` per set of `gpus_per_session` devices, all started at once (each loads
    the model in its own rank processes), then warmed up and measured one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from liveavatar.backends.liveavatar.pipelined import PipelinedGenerator

    options = {k: v for k, v in options.items() if k not in ("device", "cuda_graphs", "batch_sessions")}
    log.info("%d pipelined GPU set(s) of %d devices: %s", len(sets), settings.gpus_per_session, ", ".join(sets))

    def start(name: str) -> PipelinedGenerator:
        return PipelinedGenerator(set_devices(name), options, engine=settings.engine, fp8=settings.fp8)

    with ThreadPoolExecutor(len(sets)) as pool:
        futures = [pool.submit(start, name) for name in sets]
        generators: list[PipelinedGenerator] = []
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
            raise ValueError(f"cannot build the liveavatar backend: {failure}") from None
        raise failure
    first = generators[0]
    info.engine, info.fp8, info.attention = first.engine, settings.fp8, first.attention
    info.notes += first.notes
    if settings.engine == "compile":
        for index, generator in enumerate(generators):
            warm_up(generator, blocks=PIPELINED_WARM_UP_BLOCKS)
            interval = measure_pipeline(generator)
            if index == 0:
                info.costs = BlockCosts(
                    generator.default_size, generator.sample_steps, interval_s=interval, gpus=len(generator.devices)
                )
    return list(generators), info


def replicate(generator: LiveAvatarGenerator, device: str) -> LiveAvatarGenerator:
    """A second `LiveAvatarGenerator` like `generator` (same settings) whose models sit on `device`.

    The weights are copied tensor by tensor from `generator`'s (device to device; nothing is read from
    disk again), so every replica computes the same frames. A text encoder kept on the CPU (umT5 with a
    checkpoint, 11 GB) is shared, one prompt at a time, instead of copied. Call before `_accelerate`."""
    from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator
    from liveavatar.models.loading import Pipeline

    pipe = generator.pipeline
    text: Any = pipe.text_encoder
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
        batch_sessions=generator.max_batch,
        batch_frame_tokens=generator.batch_frame_tokens,
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


def _accelerate(generator: LiveAvatarGenerator, settings: ModelSettings, info: ModelInfo, first: bool = True) -> None:
    """`--fp8` and `--engine compile` on one generator (`liveavatar.acceleration.accelerate`); `first`:
    the first set's (process-wide parts and notes happen once)."""
    from liveavatar.acceleration.accelerate import accelerate

    engine, notes = accelerate(generator, settings.engine, settings.fp8, first=first)
    info.fp8 = info.fp8 or settings.fp8
    if info.engine != "compile+rope+vae":
        info.engine = engine
    info.notes += notes
