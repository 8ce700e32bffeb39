"""Decoding audio and images the same way everywhere (server, offline tools, tests).

Every generator consumes 16 kHz mono audio. Resampling goes through PyAV's `AudioResampler` (libswresample)
in one place so the live path and the offline path hear exactly the same samples.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_PORTRAIT_SIDE = 32
"""Smaller portraits are refused by the server and the offline tools alike: there is no face to animate."""
MAX_PORTRAIT_ASPECT = 8
"""Longest side over shortest, refused beyond it by the server and the offline tools alike: framing
(scaling to the output size, face detection on a downscaled copy) shrinks the short side to nothing,
and OpenCV fails with its raw assertion."""
TRANSPARENT_BACKGROUND = (255, 255, 255)
TRANSPARENT_BACKGROUND_NAME = "white"
"""Transparent parts of a portrait (PNG/WebP alpha, a palette's transparent colour) are composited onto
this one background everywhere, so a cut-out portrait looks the same live and offline."""


class MediaError(ValueError):
    """An input file that cannot be used; the message is meant for the user as-is."""


def portrait_shape_problem(width: int, height: int) -> str | None:
    """Why a portrait of this shape cannot be framed, or None: the one rule for uploads and files."""
    if min(width, height) < MIN_PORTRAIT_SIDE:
        return f"portrait is {width}x{height}; at least {MIN_PORTRAIT_SIDE} px a side is needed"
    if max(width, height) > MAX_PORTRAIT_ASPECT * min(width, height):
        return (
            f"portrait is {width}x{height}; it cannot be framed: the long side may be at most "
            f"{MAX_PORTRAIT_ASPECT} times the short one"
        )
    return None


@dataclass(frozen=True, eq=False)
class DecodedAudio:
    """Mono float32 audio at `sample_rate`, plus what the source looked like (for input warnings)."""

    samples: np.ndarray
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


class PcmResampler:
    """Turns `av.AudioFrame`s of any rate/layout/format into mono int16 PCM at one rate.

    One instance per stream: libswresample keeps filter state between frames, so a fresh resampler per
    frame would click at every frame boundary.
    """

    def __init__(self, rate: int = SAMPLE_RATE) -> None:
        self.rate = rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)

    def resample(self, frame: av.AudioFrame | None) -> np.ndarray:
        """Resample one frame (None flushes the filter tail); returns int16 samples, maybe empty."""
        parts = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(parts).astype(np.int16, copy=False) if parts else np.zeros(0, np.int16)


def decode_audio(path: str | Path, rate: int = SAMPLE_RATE) -> DecodedAudio:
    """Decode any audio file PyAV can read (WAV, MP3, FLAC, OGG, ...) to mono float32 at `rate`."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"audio file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"no audio stream in {path}")
            stream = container.streams.audio[0]
            source_rate = stream.rate or stream.codec_context.sample_rate
            channels = stream.channels or 1
            resampler = PcmResampler(rate)
            parts = [resampler.resample(frame) for frame in container.decode(stream)]
            parts.append(resampler.resample(None))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise MediaError(f"cannot decode audio {path}: {exc}") from None
    pcm = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    if pcm.size == 0:
        raise MediaError(f"audio file has no samples: {path}")
    return DecodedAudio(int16_to_float(pcm), rate, int(source_rate), int(channels))


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    # Same scale as int16_to_float, so PCM -> float -> PCM is lossless.
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def load_image(path: str | Path) -> np.ndarray:
    """Read a JPG/PNG/WebP file as an RGB uint8 array (see `decode_image`)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"image file not found: {path}")
    return decode_image(path.read_bytes(), str(path))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode image bytes (an upload or a file) to the RGB uint8 pixels a viewer sees; MediaError when unreadable.

    Pillow reads every mode these formats carry: the EXIF orientation is applied (phones store portraits
    sideways and tag them), transparency of any kind is composited onto `TRANSPARENT_BACKGROUND`, CMYK and
    palette images are converted, and 16-bit samples are scaled to 8 bits (not clipped to white)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return _visible_rgb(ImageOps.exif_transpose(img), name)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, UnidentifiedImageError) or not data:
            raise MediaError(f"cannot read image {name}: not a JPG/PNG/WebP file") from None
        raise MediaError(f"cannot read image {name}: {exc}") from None


def _visible_rgb(img: Any, name: str) -> np.ndarray:
    if img.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" as some Pillow versions open it)
        gray = np.asarray(img, dtype=np.float32) / 257.0
        return np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        if alpha.min() < 1.0:
            log.warning(
                "%s has transparent areas: they are shown on %s, the background used for every portrait",
                name,
                TRANSPARENT_BACKGROUND_NAME,
            )
            background = np.array(TRANSPARENT_BACKGROUND, np.float32)
            return np.rint(rgba[..., :3] * alpha + background * (1.0 - alpha)).astype(np.uint8)
        return rgba[..., :3].astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def default_portrait_path() -> Path:
    """The bundled portrait used when nobody supplies one (package data)."""
    return Path(__file__).with_name("assets") / "portrait_astronaut_512.png"
