"""Decoding audio and images the same way everywhere (server, offline tools, tests).

Every generator consumes 16 kHz mono audio. Resampling goes through PyAV's `AudioResampler` (libswresample)
in one place so the live path and the offline path hear exactly the same samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class MediaError(ValueError):
    """An input file that cannot be used; the message is meant for the user as-is."""


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
    """Read a JPG/PNG/WebP file as an RGB uint8 array."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"image file not found: {path}")
    return decode_image(path.read_bytes(), str(path))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode image bytes (an upload or a file) to RGB uint8; raises MediaError when unreadable."""
    buf = np.frombuffer(data, np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise MediaError(f"cannot read image {name}: not a JPG/PNG/WebP file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def default_portrait_path() -> Path:
    """The bundled portrait used when nobody supplies one (package data)."""
    return Path(__file__).with_name("assets") / "portrait_astronaut_512.png"
