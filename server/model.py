"""Build the configured backend once per server, and describe it honestly.

The `liveavatar` backend is loaded here from `ServerConfig` (checkpoint folder or random weights,
steps, size, motion frames), then the accelerations the engines helper offers for a loaded DiT are
applied (`--fp8`, `--engine compile`). What is asked for but not applied (TensorRT, more than one GPU)
is logged as a warning and listed in `ModelInfo.notes`, which the client shows next to the backend,
together with a "random weights" marker: a stream from random weights must never pass for the model.
"""

from __future__ import annotations

import logging
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
    notes: list[str] = field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "engine": self.engine,
            "fp8": self.fp8,
            "attention": self.attention,
            "sampleSteps": self.sample_steps,
            "device": self.device,
            "notes": self.notes,
        }


def resolve_checkpoint(folder: str, lora: str = "") -> tuple[Path, Path | None]:
    """`--ckpt-dir` may name the Wan2.2-S2V-14B folder itself or its parent (the Docker /models
    layout, with LiveAvatar/ beside it); the LoRA defaults to LiveAvatar/liveavatar.safetensors."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"checkpoint folder {root} does not exist")
    ckpt = root / CKPT_SUBDIR if (root / CKPT_SUBDIR).is_dir() else root
    if lora:
        lora_path: Path | None = Path(lora).expanduser()
        if not lora_path.is_file():
            raise ConfigError(f"LoRA file {lora_path} does not exist")
    else:
        lora_path = next((p for p in (root / LORA_FILE, ckpt.parent / LORA_FILE) if p.is_file()), None)
    return ckpt, lora_path


def build_generator(config: ServerConfig) -> tuple[Generator, ModelInfo]:
    """The backend named in `config`, ready to serve; raises ConfigError for unusable settings."""
    from liveavatar.backends import create_generator

    if config.backend != "liveavatar":
        return create_generator(config.backend), ModelInfo(weights="none", device="cpu")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = ModelInfo(sample_steps=config.sample_steps, device=device)
    options: dict[str, Any] = {
        "sample_steps": config.sample_steps,
        "motion_frames": config.motion_frames,
        "size": config.size or None,
        "device": device,
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
    try:
        generator = create_generator("liveavatar", **options)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"cannot build the liveavatar backend: {exc}") from None
    _accelerate(generator, config, info, device)
    from liveavatar.accel import choose_attention

    size = generator.default_size
    info.attention = choose_attention(generator.pipeline.dit, size.height // 8, size.width // 8)
    log.info("attention kernel: %s (fastest exact for %s)", info.attention, size)
    _check_gpus(config, info, device)
    if info.engine.startswith("compile"):
        warm_up(generator)
    for note in info.notes:
        log.warning("%s", note)
    return generator, info


def _accelerate(generator: Any, config: ServerConfig, info: ModelInfo, device: str) -> None:
    dit = generator.pipeline.dit
    if config.fp8:
        from liveavatar.accel import apply_fp8

        converted = apply_fp8(dit)
        info.fp8 = True
        log.info("fp8: %d DiT linears converted", len(converted))
        if device != "cuda":
            info.notes.append("fp8 on CPU is emulated: slower, for checking only")
    if config.engine == "compile":
        from liveavatar.accel import compile_dit, compile_rope, compile_vae

        compile_dit(dit)
        info.engine = "compile"
        if device == "cuda":  # the fused RoPE and VAE kernels pay only on a GPU (docs/benchmarks.md)
            compile_rope()
            compile_vae(generator.decoder)
            info.engine = "compile+rope+vae"
    elif config.engine == "tensorrt":
        info.notes.append("engine tensorrt is not applied by the server (no TensorRT glue for a loaded DiT): eager")


def _check_gpus(config: ServerConfig, info: ModelInfo, device: str) -> None:
    if config.gpus <= 1:
        return
    import torch

    visible = torch.cuda.device_count() if device == "cuda" else 0
    if config.gpus > visible:
        raise ConfigError(f"--gpus {config.gpus} but {visible} CUDA devices are visible")
    info.notes.append(f"--gpus {config.gpus}: not applied, the server runs every session on cuda:0")


def warm_up(generator: Any, blocks: int = 6) -> float:
    """Run a throw-away session at the default size before serving, so torch.compile's graph capture
    and autotuning (a minute or more for the 14B DiT and the VAE) happen at start-up, not in the first
    viewer's session. Six blocks cover every shape a stream goes through: the KV window growing over
    the first clip (3, 6, 9, 12 frames), the adaptive-sink prefill at block 4, and the steady state.
    Returns the seconds it took."""
    import time

    import numpy as np

    from liveavatar.generator import AudioWindow, AvatarSpec
    from liveavatar.media_io import default_portrait_path, load_image

    began = time.perf_counter()
    image = load_image(default_portrait_path())
    # A second, shorter session: on an H200 the first live session after a one-session warm-up still
    # recompiled the VAE decoder for ~13 s (a fresh decoder cache takes other guard paths).
    for session, n in enumerate((blocks, 2)):
        state = generator.open(AvatarSpec(image, f"warm-up {session}", seed=session), generator.default_size)
        try:
            for i in range(n):
                silence = np.zeros(generator.audio_samples_per_block, np.float32)
                generator.step(state, AudioWindow(silence, index=i))
        finally:
            generator.close(state)
    seconds = time.perf_counter() - began
    log.info("warm-up: %d + 2 blocks at %s in %.1f s (compiled kernels ready)", blocks, generator.default_size, seconds)
    return seconds
