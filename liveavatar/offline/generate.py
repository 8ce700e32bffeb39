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

from liveavatar.settings import ModelSettings

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
"""The flags a preset may set: the preset fills in only those not given."""


def add_generation_arguments(parser: argparse.ArgumentParser, command: str = "generate") -> None:
    """Flags shared by `generate` and `batch`: the model flags every command shares (liveavatar.settings)
    plus the offline ones. Defaults are None so presets can tell what was given; the help says them."""
    from liveavatar.offline.presets import DEFAULTS, PRESETS
    from liveavatar.settings import add_model_arguments

    add_model_arguments(parser, command)
    g = parser.add_argument_group("generation")
    g.add_argument(
        "--num-clip",
        "--num_clip",
        dest="num_clip",
        type=int,
        help="clips to generate, each --infer-frames long; capped by the audio (default: all of it)",
    )
    g.add_argument(
        "--infer-frames",
        "--infer_frames",
        dest="infer_frames",
        type=int,
        help=f"frames per clip, a multiple of 4 (default {DEFAULTS['infer_frames']})",
    )
    g.add_argument(
        "--sample-guide-scale",
        "--sample_guide_scale",
        dest="sample_guide_scale",
        type=float,
        help="classifier-free guidance scale (default 0: the distilled model needs none)",
    )
    g.add_argument(
        "--enable-online-decode",
        "--enable_online_decode",
        dest="enable_online_decode",
        action=argparse.BooleanOptionalAction,
        help="decode each block to pixels as soon as it is denoised instead of holding all latents "
        "(flat memory on long videos; default off)",
    )
    g.add_argument(
        "--offload-model",
        "--offload_model",
        dest="offload_model",
        action=argparse.BooleanOptionalAction,
        help="keep only the model stage in use on the GPU (text encoder, DiT, VAE), the rest in CPU memory: "
        "slower, fits smaller GPUs (default off)",
    )
    g.add_argument("--preset", choices=tuple(PRESETS), help="; ".join(p.description for p in PRESETS.values()))
    g.add_argument(
        "--trim-silence",
        "--trim_silence",
        dest="trim_silence",
        action="store_true",
        help="cut leading silence from the audio",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="portrait (JPG/PNG/WebP); default: the bundled portrait")
    parser.add_argument("--audio", help="speech audio (WAV/MP3/FLAC/OGG, any rate)")
    parser.add_argument("--prompt", default=None, help="text describing the person, setting and style")
    parser.add_argument(
        "--script", help="multi-role YAML script (segments of image, audio, prompt) instead of --image/--audio"
    )
    parser.add_argument("-o", "--output", help="output MP4 (default: <audio or script name>.mp4)")
    add_generation_arguments(parser)


@dataclass
class Settings:
    """The generation settings after defaults, preset and flags are merged and checked."""

    model: ModelSettings
    values: dict[str, Any]
    """The offline settings (clips, frames, guidance, decode, offload) and `size` as a Size."""

    @property
    def backend(self) -> str:
        return self.model.backend

    @property
    def size(self) -> Any:
        return self.values["size"]

    @property
    def seed(self) -> int:
        return self.model.seed

    def offline_options(self) -> dict[str, Any]:
        """The offline tools' own options a backend's `create` may take besides the model settings."""
        return {"guide_scale": self.values["sample_guide_scale"], "offload_model": self.values["offload_model"]}

    def create_generator(self) -> Any:
        """The chosen backend's generator for these settings (`Backend.create`)."""
        from liveavatar.backends import backend

        if self.values["offload_model"] and self.values["enable_online_decode"]:
            log.warning("--offload-model with --enable-online-decode swaps DiT and VAE at every block (slow)")
        return backend(self.backend).create(self.model, **self.offline_options())

    @property
    def online_decode(self) -> bool:
        return bool(self.values["enable_online_decode"])

    def max_frames(self) -> int | None:
        clips = self.values["num_clip"]
        return None if clips is None else clips * self.values["infer_frames"]


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Merge defaults < preset < flags and validate (the model settings as every command does);
    raises InputError with a one-line message on impossible values."""
    from liveavatar.backends import backend
    from liveavatar.generator import Size
    from liveavatar.offline.inputs import InputError, require_file
    from liveavatar.offline.presets import resolve
    from liveavatar.settings import SettingsError, validate

    values = resolve({k: getattr(args, k, None) for k in SETTING_FLAGS}, args.preset)
    if values["infer_frames"] <= 0 or values["infer_frames"] % 4:
        raise InputError(f"--infer-frames must be a positive multiple of 4, got {values['infer_frames']}")
    if values["num_clip"] is not None and values["num_clip"] < 1:
        raise InputError(f"--num-clip must be at least 1, got {values['num_clip']}")
    if values["sample_guide_scale"] < 0:
        raise InputError("--sample-guide-scale cannot be negative")
    try:
        model = validate(
            ModelSettings.from_args(args, size=values["size"], sample_steps=values["sample_steps"], seed=values["seed"])
        )
    except SettingsError as exc:
        raise InputError(str(exc)) from None
    if values["size"] and model.size != str(values["size"]):
        log.info("--size %s is an area limit for the DiT: generating %s", values["size"], model.size)
    values["size"] = Size.parse(model.size)
    if backend(model.backend).takes_weights:
        if model.ckpt_dir:
            require_file(model.ckpt_dir, "--ckpt-dir")
        if model.lora:
            require_file(model.lora, "--lora")
    else:
        ignored = [flag for flag, value in (("--ckpt-dir", model.ckpt_dir), ("--lora", model.lora)) if value]
        if ignored:
            log.warning("the %s backend ignores %s", model.backend, ", ".join(ignored))
    return Settings(model, values)


def dit_size(size: Any) -> Any:
    """The size the DiT makes for `size` (liveavatar.settings.fit_size); InputError if it cannot."""
    from liveavatar.offline.inputs import InputError
    from liveavatar.settings import SettingsError, fit_size

    try:
        return fit_size("liveavatar", size)
    except SettingsError as exc:
        raise InputError(str(exc)) from None


def build_segments(args: argparse.Namespace, settings: Settings) -> list[Any]:
    """Check every input and turn it into render segments (one, or one per script role)."""
    from liveavatar.backends import backend
    from liveavatar.generator import AvatarSpec
    from liveavatar.media_io import default_portrait_path
    from liveavatar.offline.inputs import InputError, check_prompt, load_portrait, load_speech, require_file
    from liveavatar.offline.render import RenderSegment
    from liveavatar.offline.script import load_script

    size, seed = settings.size, settings.seed
    # a backend that ignores the prompt (the preview) gets no advice about it
    prompt_of = check_prompt if backend(settings.backend).uses_prompt else str.strip
    if args.script:
        if args.image or args.audio or args.prompt:
            raise InputError(
                "--script already names each role's image, audio and prompt; drop --image/--audio/--prompt"
            )
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
        generator = settings.create_generator()
        result = render(
            generator,
            segments,
            settings.size,
            output,
            settings.max_frames(),
            progress=sys.stderr.isatty(),
            online_decode=settings.online_decode,
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
