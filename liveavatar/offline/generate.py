"""`liveavatar generate`: one portrait (or a multi-role script) + audio -> an MP4, with Live Avatar's flags.

Top-level imports stay light (argparse only) so `liveavatar --help` is instant; numpy, PyAV and the
backends load when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SETTING_FLAGS = (
    "size",
    "num_clip",
    "infer_frames",
    "sample_steps",
    "sample_guide_scale",
    "seed",
    "enable_online_decode",
    "offload_model",
)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `generate` and `batch` (defaults are None so presets can tell what was given)."""
    from liveavatar.offline.presets import DEFAULTS, PRESETS

    g = parser.add_argument_group("generation")
    g.add_argument("--size", help=f"output width*height, e.g. 704*384, 688*368, 384*256 (default {DEFAULTS['size']})")
    g.add_argument("--num_clip", type=int, help="clips to generate, each --infer_frames long; capped by the audio (default: all of it)")
    g.add_argument("--infer_frames", type=int, help=f"frames per clip, a multiple of 4 (default {DEFAULTS['infer_frames']})")
    g.add_argument("--sample_steps", type=int, help=f"denoising steps per block (default {DEFAULTS['sample_steps']})")
    g.add_argument("--sample_guide_scale", type=float, help="classifier-free guidance scale (default 0: the distilled model needs none)")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument(
        "--enable_online_decode",
        action=argparse.BooleanOptionalAction,
        help="decode each block to pixels as soon as it is denoised instead of holding all latents (flat memory on long videos; default off)",
    )
    g.add_argument(
        "--offload_model",
        action=argparse.BooleanOptionalAction,
        help="keep only the model stage in use on the GPU (text encoder, DiT, VAE), the rest in CPU memory: slower, fits smaller GPUs (default off)",
    )
    g.add_argument("--ckpt_dir", help="folder with the LiveAvatar / Wan2.2-S2V checkpoints (liveavatar backend)")
    g.add_argument("--lora_path", help="LiveAvatar LoRA weights to merge into the DiT (liveavatar backend)")
    g.add_argument("--backend", choices=("liveavatar", "preview"), default="liveavatar", help="liveavatar (diffusion, GPU) or preview (CPU, no weights)")
    g.add_argument("--random_weights", choices=("tiny", "full"), help=argparse.SUPPRESS)  # tests and benchmarks only
    g.add_argument("--preset", choices=tuple(PRESETS), help="; ".join(p.description for p in PRESETS.values()))
    g.add_argument("--trim-silence", dest="trim_silence", action="store_true", help="cut leading silence from the audio")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="portrait (JPG/PNG/WebP); default: the bundled portrait")
    parser.add_argument("--audio", help="speech audio (WAV/MP3/FLAC/OGG, any rate)")
    parser.add_argument("--prompt", default=None, help="text describing the person, setting and style")
    parser.add_argument("--script", help="multi-role YAML script (segments of image, audio, prompt) instead of --image/--audio")
    parser.add_argument("-o", "--output", help="output MP4 (default: <audio or script name>.mp4)")
    add_generation_arguments(parser)


@dataclass
class Settings:
    """The generation settings after defaults, preset and flags are merged and checked."""

    backend: str
    values: dict[str, Any]
    ckpt_dir: str | None = None
    lora_path: str | None = None
    random_weights: str | None = None

    @property
    def size(self) -> Any:
        return self.values["size"]

    @property
    def seed(self) -> int:
        return int(self.values["seed"])

    def generator_options(self) -> dict[str, Any]:
        """What the chosen backend's constructor takes; the preview needs none of the model options."""
        if self.backend == "preview":
            return {}
        wanted = {
            "ckpt_dir": self.ckpt_dir,
            "lora_path": self.lora_path,
            "random_weights": self.random_weights,
            "sample_steps": self.values["sample_steps"],
            "guide_scale": self.values["sample_guide_scale"],
            "seed": self.seed,
            "offload_model": self.values["offload_model"],
        }
        if self.values["offload_model"] and self.values["enable_online_decode"]:
            log.warning("--offload_model with --enable_online_decode swaps DiT and VAE at every block (slow)")
        return wanted

    @property
    def online_decode(self) -> bool:
        return bool(self.values["enable_online_decode"])

    def max_frames(self) -> int | None:
        clips = self.values["num_clip"]
        return None if clips is None else clips * self.values["infer_frames"]


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Merge and validate; raises InputError with a one-line message on impossible values."""
    from liveavatar.offline.inputs import InputError, parse_size, require_file
    from liveavatar.offline.presets import resolve

    values = resolve({k: getattr(args, k, None) for k in SETTING_FLAGS}, args.preset)
    values["size"] = parse_size(str(values["size"]))
    if values["infer_frames"] <= 0 or values["infer_frames"] % 4:
        raise InputError(f"--infer_frames must be a positive multiple of 4, got {values['infer_frames']}")
    if values["num_clip"] is not None and values["num_clip"] < 1:
        raise InputError(f"--num_clip must be at least 1, got {values['num_clip']}")
    if not 1 <= values["sample_steps"] <= 50:
        raise InputError(f"--sample_steps must be between 1 and 50, got {values['sample_steps']}")
    if values["sample_guide_scale"] < 0:
        raise InputError("--sample_guide_scale cannot be negative")
    settings = Settings(args.backend, values, args.ckpt_dir, args.lora_path, getattr(args, "random_weights", None))
    if args.backend == "liveavatar":
        if not args.ckpt_dir and not settings.random_weights:
            raise InputError("--backend liveavatar needs --ckpt_dir (the downloaded checkpoints); or use --backend preview")
        if args.ckpt_dir:
            require_file(args.ckpt_dir, "--ckpt_dir")
        if args.lora_path:
            require_file(args.lora_path, "--lora_path")
        values["size"] = dit_size(values["size"])
    else:
        ignored = [flag for flag in ("ckpt_dir", "lora_path") if getattr(args, flag)]
        if ignored:
            log.warning("the preview backend ignores %s", ", ".join("--" + f for f in ignored))
    return settings


def dit_size(size: Any) -> Any:
    """The DiT makes multiples of 64 only; other sizes (the original's "688*368" preset) are an area
    limit, as in the original CLI, fitted to their own aspect ratio (688*368 -> 640*384)."""
    from liveavatar.generator import Size
    from liveavatar.models.config import output_size
    from liveavatar.offline.inputs import InputError

    try:
        width, height = output_size(str(size))
    except ValueError as exc:
        raise InputError(f"--size {size}: {exc}") from None
    if (width, height) != (size.width, size.height):
        log.info("--size %s is an area limit for the DiT: generating %dx%d", size, width, height)
    return Size(width, height)


def build_segments(args: argparse.Namespace, settings: Settings) -> list[Any]:
    """Check every input and turn it into render segments (one, or one per script role)."""
    from liveavatar.backends import USES_PROMPT
    from liveavatar.generator import AvatarSpec
    from liveavatar.media_io import default_portrait_path
    from liveavatar.offline.inputs import InputError, check_prompt, load_portrait, load_speech, require_file
    from liveavatar.offline.render import RenderSegment
    from liveavatar.offline.script import load_script

    size, seed = settings.size, settings.seed
    # a backend that ignores the prompt (the preview) gets no advice about it
    prompt_of = check_prompt if USES_PROMPT[settings.backend] else str.strip
    if args.script:
        if args.image or args.audio or args.prompt:
            raise InputError("--script already names each role's image, audio and prompt; drop --image/--audio/--prompt")
        segments = []
        for part in load_script(args.script):
            portrait = load_portrait(require_file(part.image, "image"), size)
            audio = load_speech(require_file(part.audio, "audio"), args.trim_silence)
            part_seed = part.seed if part.seed is not None else seed
            spec = AvatarSpec(portrait.image, prompt_of(part.prompt), part_seed, face=portrait.face)
            segments.append(RenderSegment(spec, audio, part.transition))
        return segments
    if not args.audio:
        raise InputError("missing --audio (or --script for a multi-role video)")
    image_path = args.image or default_portrait_path()
    if not args.image:
        log.info("no --image given: using the bundled portrait")
    portrait = load_portrait(require_file(image_path, "image"), size)
    audio = load_speech(require_file(args.audio, "audio"), args.trim_silence)
    spec = AvatarSpec(portrait.image, prompt_of(args.prompt or ""), seed, face=portrait.face)
    return [RenderSegment(spec, audio)]


def default_output(args: argparse.Namespace) -> Path:
    return Path(Path(args.script or args.audio or "output").stem + ".mp4")


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    root.setLevel(level)


def run(args: argparse.Namespace) -> int:
    from liveavatar.backends import create_generator
    from liveavatar.media_io import MediaError
    from liveavatar.offline.inputs import InputError
    from liveavatar.offline.render import OutputError, render

    setup_logging(args.verbose)
    try:
        settings = resolve_settings(args)
        output = Path(args.output) if args.output else default_output(args)
        if output.suffix.lower() != ".mp4":
            raise InputError(f"output {output} must end in .mp4")
        segments = build_segments(args, settings)
        generator = create_generator(settings.backend, **settings.generator_options())
        result = render(
            generator, segments, settings.size, output, settings.max_frames(),
            progress=sys.stderr.isatty(), online_decode=settings.online_decode,
        )
    except (InputError, MediaError, OutputError) as exc:
        print(f"liveavatar generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("liveavatar generate: interrupted", file=sys.stderr)
        return 130
    seconds = result.frames / generator.fps
    print(f"{result.output}: {result.frames} frames ({seconds:.2f} s) generated at {result.fps:.1f} fps")
    return 0
