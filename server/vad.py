"""Voice activity detection: the per-frame speech/silence decision the segmenter smooths.

The segmenter needs only this: given one short frame of 16-bit mono PCM, is it speech? Any detector
with that method (and the rates and frame lengths it judges) can replace webrtcvad, the default:
pass it as `Segmenter(vad=...)`.
"""

from __future__ import annotations

from typing import Protocol

import webrtcvad


class VoiceActivityDetector(Protocol):
    """Decides, frame by frame, whether 16-bit mono PCM holds speech."""

    sample_rates: tuple[int, ...]
    """Stream rates it judges; the segmenter refuses any other."""
    frame_ms: tuple[int, ...]
    """Frame lengths it judges, in ms; the segmenter cuts frames of one of them."""

    def is_speech(self, frame: bytes, sample_rate: int) -> bool:
        """`frame`: signed 16-bit little-endian mono PCM at `sample_rate`, one of `frame_ms` long.
        Called in stream order from one thread, for the frames above the segmenter's level floor
        (`min_level_dbfs`) only: quieter ones are silence without asking."""
        ...


class WebRtcVad:
    """The default detector: Google's WebRTC VAD (a GMM over band energies), cheap and CPU-only."""

    sample_rates: tuple[int, ...] = (8_000, 16_000, 32_000, 48_000)
    frame_ms: tuple[int, ...] = (10, 20, 30)

    def __init__(self, mode: int = 2) -> None:
        """`mode`: aggressiveness 0 (most speech) … 3 (least); `--vad-mode`."""
        self._vad = webrtcvad.Vad(mode)

    def is_speech(self, frame: bytes, sample_rate: int) -> bool:
        return self._vad.is_speech(frame, sample_rate)
