"""The model settings shared by `serve`, `generate`, `batch` and `bench`: one set of flags, one set of
defaults, one backend rule, one size rule and one validation.

Users come with the original LiveAvatar scripts, so every flag keeps its original underscore spelling
as an alias of the hyphenated one (`--ckpt_dir`, `--sample_steps`, `--lora_path`, `--random_weights`).
The flags are registered with default None so a command can tell what was given: `serve` layers a
TOML file and the environment under the flags, `generate` layers its presets. `validate` then fills
in the defaults and the rules, so the server and the offline tools accept and refuse the same values
with the same words.

The rules:
- backend: any name in the registry (`liveavatar.backends`); `liveavatar` when a checkpoint folder or
  random weights are given, else `preview`; `--backend` overrides it.
- size: `width*height`, each a multiple of 16 between 128 and 1280; default the backend's own
  (`preview` 512*512, `liveavatar` 704*384, its tiny random model 128*128). The backend fits it to what
  it makes (`Backend.fit_size`): `liveavatar` to the DiT's grid of 64 at about the same area
  (688*368 -> 640*384), online and offline alike.
- whatever else a backend needs (weights) it checks itself (`Backend.check`); GPUs per session and CUDA
  graphs only where the backend has them.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from liveavatar import backends
from liveavatar.generator import SIZE_MAX, SIZE_MIN, SIZE_MULTIPLE, Size

RANDOM_WEIGHTS = ("tiny", "14b")
RANDOM_WEIGHTS_ALIASES = {"full": "14b"}
"""The original tools' name for the full-size architecture."""
ENGINES = ("eager", "compile")
TENSORRT_REFUSED = (
    "liveavatar does not run TensorRT engines here: they (`liveavatar engines build --tensorrt`) cover only "
    "the steady-state block step in bf16, not a stream's first blocks, the adaptive-sink prefill or FP8; "
    "use --engine compile (with --fp8), the fastest measured path (docs/benchmarks.md)"
)
STEPS_MIN, STEPS_MAX = 1, 50
GPUS_PER_SESSION_MAX = 8
DEFAULT_SAMPLE_STEPS = 4
"""The LiveAvatar LoRA is distilled for 4 steps."""
DEFAULT_MOTION_FRAMES = 73
DEFAULT_SEED = 0

_OFFLINE = (
    "backend",
    "ckpt_dir",
    "lora",
    "random_weights",
    "size",
    "sample_steps",
    "motion_frames",
    "engine",
    "fp8",
    "seed",
)
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "serve": ("backend", "ckpt_dir", "lora", "random_weights", "size", "sample_steps", "motion_frames", "engine", "fp8",
              "gpus_per_session", "cuda_graphs", "batch_sessions"),
    "generate": _OFFLINE,
    "batch": _OFFLINE,
    "bench": ("ckpt_dir", "random_weights", "size", "sample_steps", "engine", "fp8"),
}  # fmt: skip
"""The model flags each command takes: those it can honour (bench measures the DiT alone: no backend,
no LoRA, its own ranks and graphs flags; the server seeds each session itself; the offline tools run one
generator on one device)."""


class SettingsError(ValueError):
    """A model setting that cannot work; one line naming the flag, the same from every command."""


@dataclass
class ModelSettings:
    """What to generate with. Empty `backend` and `size` mean "by the rules" until `validate`."""

    backend: str = ""
    ckpt_dir: str = ""
    lora: str = ""
    """LoRA to merge; empty: `LiveAvatar/liveavatar.safetensors` beside the checkpoint, if present."""
    random_weights: str = ""
    """`tiny` or `14b`: the architecture with random weights, no files (tests, benchmarks)."""
    size: str = ""
    sample_steps: int = DEFAULT_SAMPLE_STEPS
    motion_frames: int = DEFAULT_MOTION_FRAMES
    engine: str = "eager"
    fp8: bool = False
    seed: int = DEFAULT_SEED
    gpus_per_session: int = 1
    """GPUs one session's blocks flow through (the timestep-forcing pipeline over a GPU set)."""
    cuda_graphs: bool = False
    """Replay steady-state forwards from per-session CUDA graphs."""
    batch_sessions: bool = False
    """Make ready blocks of two sessions on one GPU in one forward at small sizes (opt-in: on an H200 the
    forward alone was 10 % faster but the live server slower, docs/benchmarks.md 2026-11-30)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> ModelSettings:
        """The flags that were given (not None), the defaults for the rest; not yet validated."""
        values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
        values.update(overrides)
        return cls(**{k: v for k, v in values.items() if v is not None})


def default_backend(ckpt_dir: str, random_weights: str) -> str:
    """Weights given mean the diffusion model is wanted; nothing given means the CPU preview."""
    return "liveavatar" if ckpt_dir or random_weights else "preview"


def default_size(backend: str, random_weights: str = "") -> str:
    return backends.backend(backend).default_size(ModelSettings(backend=backend, random_weights=random_weights))


def parse_size(text: str) -> Size:
    """`W*H` (or `WxH`) in the range every command accepts; SettingsError names `--size` otherwise."""
    try:
        width, height = (int(v) for v in str(text).lower().replace("x", "*").split("*"))
    except ValueError:
        raise SettingsError(f"--size {text}: must look like 704*384 (width*height)") from None
    for name, value in (("width", width), ("height", height)):
        if value % SIZE_MULTIPLE or not SIZE_MIN <= value <= SIZE_MAX:
            raise SettingsError(
                f"--size {text}: {name} {value} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MIN} and {SIZE_MAX}"
            )
    return Size(width, height)


def fit_size(backend: str, size: Size) -> Size:
    """The size the backend makes for `size` (`Backend.fit_size`: the DiT makes multiples of 64 only, so
    for `liveavatar` any other size is an area limit fitted to its own aspect ratio, 688*368 -> 640*384)."""
    try:
        return backends.backend(backend).fit_size(size)
    except ValueError as exc:
        raise SettingsError(f"--size {size}: {exc}") from None


def validate(settings: ModelSettings) -> ModelSettings:
    """A checked copy with the backend and size rules applied; SettingsError with one clear line."""
    weights = RANDOM_WEIGHTS_ALIASES.get(settings.random_weights, settings.random_weights)
    if weights not in ("", *RANDOM_WEIGHTS):
        raise SettingsError(f"--random-weights must be {' or '.join(RANDOM_WEIGHTS)}, got {weights!r}")
    name = settings.backend or default_backend(settings.ckpt_dir, weights)
    if name not in backends.names():
        raise SettingsError(f"--backend must be {' or '.join(backends.names())}, got {name!r}")
    backend = backends.backend(name)
    try:
        backend.check(dataclasses.replace(settings, backend=name, random_weights=weights))
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if settings.engine == "tensorrt":
        raise SettingsError(f"--engine tensorrt: {TENSORRT_REFUSED}")
    if settings.engine not in ENGINES:
        raise SettingsError(f"--engine must be one of {', '.join(ENGINES)}, got {settings.engine!r}")
    if not STEPS_MIN <= settings.sample_steps <= STEPS_MAX:
        raise SettingsError(f"--sample-steps must be between {STEPS_MIN} and {STEPS_MAX}, got {settings.sample_steps}")
    if settings.motion_frames < 1 or (settings.motion_frames - 1) % 4:
        raise SettingsError(f"--motion-frames must be 1 + 4k (73 in the reference), got {settings.motion_frames}")
    if not 1 <= settings.gpus_per_session <= GPUS_PER_SESSION_MAX:
        raise SettingsError(f"--gpus-per-session must be 1..{GPUS_PER_SESSION_MAX}, got {settings.gpus_per_session}")
    if settings.gpus_per_session > backend.max_gpus_per_session:
        raise SettingsError(
            f"--gpus-per-session is for the liveavatar backend; the {name} backend runs a session on one device"
        )
    if settings.cuda_graphs and not backend.cuda_graphs:
        raise SettingsError(f"--cuda-graphs is for the liveavatar backend; the {name} backend has no CUDA graphs")
    if settings.cuda_graphs and settings.gpus_per_session > 1:
        raise SettingsError("--cuda-graphs is for sessions on one GPU; drop it with --gpus-per-session > 1")
    if settings.batch_sessions and name != "liveavatar":
        raise SettingsError(f"--batch-sessions is for the liveavatar backend; the {name} backend makes blocks alone")
    if settings.batch_sessions and settings.gpus_per_session > 1:
        raise SettingsError("--batch-sessions is for sessions on one GPU; drop it with --gpus-per-session > 1")
    size = fit_size(name, parse_size(settings.size or default_size(name, weights)))
    return dataclasses.replace(settings, backend=name, random_weights=weights, size=str(size))


_OPTIONS: dict[str, tuple[str, ...]] = {
    "backend": ("--backend",),
    "ckpt_dir": ("--ckpt-dir", "--ckpt_dir"),
    "lora": ("--lora", "--lora-path", "--lora_path"),
    "random_weights": ("--random-weights", "--random_weights"),
    "size": ("--size",),
    "sample_steps": ("--sample-steps", "--sample_steps"),
    "motion_frames": ("--motion-frames", "--motion_frames"),
    "engine": ("--engine",),
    "fp8": ("--fp8",),
    "seed": ("--seed",),
    "gpus_per_session": ("--gpus-per-session",),
    "cuda_graphs": ("--cuda-graphs",),
    "batch_sessions": ("--batch-sessions",),
}
_EXTRA_ALIASES = {("bench", "random_weights"): ("--arch",), ("bench", "sample_steps"): ("--steps",)}
"""bench's own earlier spellings."""


def _random_weights(text: str) -> str:
    return RANDOM_WEIGHTS_ALIASES.get(text, text)


def add_model_arguments(parser: argparse.ArgumentParser, command: str, **defaults: Any) -> None:
    """Register `command`'s model flags (COMMAND_SETTINGS) in one group, with every alias. Defaults
    stay None (what was given must be visible) unless `defaults` names one; the help says each default."""
    group = parser.add_argument_group("model")
    live = backends.backend("liveavatar").default_sizes
    sizes = f"preview {default_size('preview')}, liveavatar {live['']}"
    tiny = live["tiny"]
    help_of = {
        "backend": "preview (CPU, no weights) or liveavatar (the diffusion model, GPU), or another registered "
        "backend "
        "(default: liveavatar when --ckpt-dir or --random-weights is given, else preview)",
        "ckpt_dir": "the Wan2.2-S2V-14B folder, or a folder holding it and LiveAvatar/ (default: none)",
        "lora": "LoRA to merge (default: LiveAvatar/liveavatar.safetensors beside the checkpoint, if present)",
        "random_weights": "the architecture with random weights instead of a checkpoint, for tests and "
        "benchmarks (full = 14b)",
        "size": f"output width*height, multiples of {SIZE_MULTIPLE} from {SIZE_MIN} to {SIZE_MAX}; liveavatar "
        "fits it to the DiT's grid of 64 "
        + (
            f"(default per --arch: tiny {tiny}, 14b {live['14b']})"
            if command == "bench"
            else f"(default: the backend's own: {sizes}, tiny random weights {tiny})"
        ),
        "sample_steps": f"denoising steps per block, {STEPS_MIN} to {STEPS_MAX} (default {DEFAULT_SAMPLE_STEPS})",
        "motion_frames": f"frames of the static motion video per avatar, 1 + 4k (default {DEFAULT_MOTION_FRAMES})",
        "engine": f"DiT execution: {' or '.join(ENGINES)} (torch.compile) (default eager)",
        "fp8": "FP8 linears in the DiT (docs/model.md §5.2)",
        "seed": f"random seed (default {DEFAULT_SEED})",
        "gpus_per_session": "GPUs one session's blocks flow through (timestep-forcing pipeline, one process per "
        "GPU): --gpus 2 --gpus-per-session 2 runs one session up to twice as fast (default 1)",
        "cuda_graphs": "replay steady-state DiT forwards from per-session CUDA graphs (GPU; pays most at small sizes)",
        "batch_sessions": "make two sessions' ready blocks in one DiT forward at sizes of at most 512 tokens per "
        "latent frame, where the warm-up measures it faster (GPU; off by default: slower live on an H200)",
    }
    kinds: dict[str, dict[str, Any]] = {
        "backend": {"metavar": "NAME"},
        "ckpt_dir": {"metavar": "DIR"},
        "lora": {"metavar": "PATH"},
        "random_weights": {"type": _random_weights, "choices": RANDOM_WEIGHTS},
        "size": {"metavar": "W*H"},
        "sample_steps": {"type": int, "metavar": "N"},
        "motion_frames": {"type": int, "metavar": "N"},
        "fp8": {"action": "store_const", "const": True},
        "seed": {"type": int, "metavar": "N"},
        "gpus_per_session": {"type": int, "metavar": "N"},
        "cuda_graphs": {"action": "store_const", "const": True},
        "batch_sessions": {"action": "store_const", "const": True},
    }
    for name in COMMAND_SETTINGS[command]:
        options = _OPTIONS[name] + _EXTRA_ALIASES.get((command, name), ())
        group.add_argument(*options, dest=name, default=defaults.get(name), help=help_of[name], **kinds.get(name, {}))
