"""Writing MP4 files (H.264 video + AAC audio) with PyAV, block by block.

Video and audio both start at presentation time 0 and are written as they are generated, so memory stays
flat for long videos and the two streams cannot drift: frame i is shown at i/fps and audio sample n is
played at n/sample_rate, exactly the timing of the input audio.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from liveavatar.media_io import float_to_int16

log = logging.getLogger(__name__)

AAC_FRAME = 1024
"""Samples per AAC frame; audio is fed to the encoder in these units."""


class Mp4Writer:
    """An open MP4 file: `write_frames` and `write_audio` in any interleaving, then `close`."""

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: int = 25,
        sample_rate: int = 16_000,
        crf: int = 20,
        preset: str = "veryfast",
    ) -> None:
        self.path = Path(path)
        self.fps = fps
        self.sample_rate = sample_rate
        self._container = av.open(str(self.path), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.codec_context.time_base = Fraction(1, fps)
        self._video.options = {"crf": str(crf), "preset": preset}
        self._audio = self._container.add_stream("aac", rate=sample_rate)
        self._audio.layout = "mono"
        self._audio.bit_rate = 96_000
        self._frames = 0
        self._samples = 0
        self._audio_tail = np.zeros(0, np.int16)
        self._closed = False

    @property
    def frames_written(self) -> int:
        return self._frames

    def write_frames(self, frames: np.ndarray) -> None:
        """Append RGB uint8 frames of shape [N, H, W, 3]."""
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self._frames
            frame.time_base = Fraction(1, self.fps)
            self._container.mux(self._video.encode(frame))
            self._frames += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """Append mono float32 samples in [-1, 1] at `sample_rate`."""
        pcm = np.concatenate([self._audio_tail, float_to_int16(samples)])
        whole = len(pcm) // AAC_FRAME * AAC_FRAME
        for start in range(0, whole, AAC_FRAME):
            self._encode_audio(pcm[start : start + AAC_FRAME])
        self._audio_tail = pcm[whole:]

    def _encode_audio(self, pcm: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._samples
        frame.time_base = Fraction(1, self.sample_rate)
        self._container.mux(self._audio.encode(frame))
        self._samples += len(pcm)

    def close(self) -> None:
        """Flush both encoders and finish the file."""
        if self._closed:
            return
        self._closed = True
        try:
            if len(self._audio_tail):
                self._encode_audio(self._audio_tail)
            self._container.mux(self._audio.encode(None))
            self._container.mux(self._video.encode(None))
        finally:
            self._container.close()
        log.debug("wrote %s: %d frames, %.2f s of audio", self.path, self._frames, self._samples / self.sample_rate)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe(path: str | Path) -> dict[str, float]:
    """Frame count, fps, video and audio duration of a written file (used by tests and batch summaries)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        fps = float(video.average_rate or video.guessed_rate or 0)
        width, height = video.codec_context.width, video.codec_context.height
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        rate = audio.rate
        samples = sum(frame.samples for frame in container.decode(audio))
    return {
        "frames": frames,
        "fps": fps,
        "width": width,
        "height": height,
        "video_seconds": frames / fps if fps else 0.0,
        "audio_seconds": samples / rate,
    }
