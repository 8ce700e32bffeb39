"""Input checks for offline generation, following the Live Avatar guides' advice.

Problems that make a run pointless (unreadable files, bad sizes, contradictory flags) raise `InputError`
with a one-line message that the CLI prints as-is. Problems that only hurt quality (a small portrait, no
face, quiet audio, a thin prompt) are logged as warnings and the run goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from liveavatar.backends.preview.face import detect_faces, fallback_face, fit_portrait
from liveavatar.generator import Size
from liveavatar.media_io import IMAGE_SUFFIXES, MediaError, decode_audio, load_image, portrait_shape_problem

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 512
MIN_SOURCE_RATE = 16_000
QUIET_PEAK_DBFS = -30.0
SILENCE_DBFS = -45.0
PROMPT_MIN_WORDS, PROMPT_MAX_WORDS = 4, 200
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus")


class InputError(ValueError):
    """A user input that cannot work; the message is one line, fit to print without a traceback."""


class InputProblems(InputError):
    """Every problem found in a manifest or script before a run, reported together, so that one round of
    fixes is enough (a first-problem-only error makes the user re-run once per mistake)."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = problems
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {what}; nothing was run:"
        super().__init__("\n  ".join([head, *problems]))


def unknown_key(key: object, known: set[str] | frozenset[str]) -> str:
    """`'imgae' (did you mean 'image'?)`: repr shows what is really there (a byte-order mark, a space)."""
    import difflib

    close = difflib.get_close_matches(str(key).strip().lower(), sorted(known), n=1, cutoff=0.6)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def read_text(path: Path, what: str) -> str:
    """A text input as UTF-8, with or without a byte-order mark (spreadsheets write one), any line ending."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


class FittedPortrait(NamedTuple):
    """A portrait cropped to the output size, and where its face is in the crop."""

    image: np.ndarray
    face: tuple[float, float, float, float]


def load_portrait(path: str | Path, size: Size) -> FittedPortrait:
    """Read the portrait, warn about what will hurt quality, and fit it to `size` with the face centred.

    The face is found once, on the whole portrait, and its box is carried through the crop: detecting
    again on the crop can pick a face-like patch of background once the crop has cut into the picture."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"image {path} must be a JPG, PNG or WebP file")
    try:
        image = load_image(path)
    except MediaError as exc:
        raise InputError(str(exc)) from None
    h, w = image.shape[:2]
    problem = portrait_shape_problem(w, h)  # as the server refuses an upload
    if problem:
        raise InputError(f"image {path}: {problem}")
    if min(h, w) < MIN_IMAGE_SIDE:
        log.warning(
            "image %s is %dx%d, below %dx%d: expect a soft, less detailed avatar",
            path,
            w,
            h,
            MIN_IMAGE_SIDE,
            MIN_IMAGE_SIDE,
        )
    faces = detect_faces(image)
    if not faces:
        log.warning("no face found in %s: use a clear, front-facing portrait for best results", path)
        face = fallback_face(h, w)
    else:
        if len(faces) > 1:
            log.warning("%d faces found in %s: the largest one will be animated", len(faces), path)
        face = faces[0]
    fitted, box = fit_portrait(image, face, size.width, size.height)
    return FittedPortrait(fitted, (box.x, box.y, box.w, box.h))


def load_speech(path: str | Path, trim_silence: bool = False) -> np.ndarray:
    """Decode the audio to 16 kHz mono float32, warn about poor sources, optionally cut leading silence."""
    path = Path(path)
    try:
        audio = decode_audio(path)
    except MediaError as exc:
        raise InputError(str(exc)) from None
    if audio.source_rate < MIN_SOURCE_RATE:
        log.warning("audio %s is sampled at %d Hz, below 16 kHz: lip sync may suffer", path, audio.source_rate)
    samples = audio.samples
    peak = float(np.max(np.abs(samples)))
    if 20 * np.log10(peak + 1e-9) < QUIET_PEAK_DBFS:
        log.warning(
            "audio %s is very quiet (peak %.0f dBFS): normalise it for livelier lips", path, 20 * np.log10(peak + 1e-9)
        )
    if trim_silence:
        start = leading_silence(samples)
        if start >= len(samples):
            raise InputError(f"audio {path} is silent throughout; nothing left after --trim-silence")
        if start:
            log.info("trimmed %.2f s of leading silence from %s", start / audio.sample_rate, path)
            samples = samples[start:]
    return samples


def leading_silence(samples: np.ndarray, rate: int = 16_000, keep_s: float = 0.1) -> int:
    """Samples before the first 20 ms frame above SILENCE_DBFS, less a short lead-in kept for the onset."""
    frame = rate // 50
    n = len(samples) // frame
    if n == 0:
        return 0
    level = 10 * np.log10(np.mean(samples[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(level > SILENCE_DBFS)
    if len(loud) == 0:
        return len(samples)
    return max(0, int(loud[0]) * frame - int(keep_s * rate))


def check_prompt(prompt: str) -> str:
    """Warn about prompts the model handles poorly; returns the prompt stripped."""
    prompt = (prompt or "").strip()
    words = len(prompt.split())
    if not words:
        log.warning("the prompt is empty: describe the person, setting and style for better results")
    elif words < PROMPT_MIN_WORDS:
        log.warning("the prompt is very short (%d words): a sentence or two describing the scene works better", words)
    elif words > PROMPT_MAX_WORDS:
        log.warning(
            "the prompt has %d words, over ~%d: the text encoder truncates long prompts", words, PROMPT_MAX_WORDS
        )
    return prompt


def require_file(path: str | Path | None, what: str) -> Path:
    if not path:
        raise InputError(f"missing {what}")
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    return p
