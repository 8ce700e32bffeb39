"""The `preview` backend: a CPU-only talking portrait that needs no model weights.

It exists so that the whole product (server, browser, offline tools, CI) runs on any laptop. The face is
found once per portrait with OpenCV's bundled Haar cascades and fitted with a geometric landmark model
(`landmarks`); each frame is a cheap warp of the portrait's own pixels (`rig`) whose controls come
from the audio: loudness opens the jaw, the spectrum shapes the
lips (low centroid -> rounded, bright/hissy -> wide and less open), both smoothed with a fast attack and a
slower release as real articulators move. Blinks, sway and breathing come from the session's seeded RNG
and frame clock, so a session is reproducible and never freezes, even in silence.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from liveavatar.backends.preview.face import FaceBox, find_face, fit_portrait
from liveavatar.backends.preview.rig import FacePose, FaceRig
from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size
from liveavatar.media_io import default_portrait_path, load_image

log = logging.getLogger(__name__)

BLINK_PROFILE = (0.35, 0.85, 1.0, 0.7, 0.3, 0.1)
"""Lid closure per frame at 25 fps: a blink lasts about a quarter of a second, closing faster than opening."""


def default_spec(prompt: str = "", seed: int = 0) -> AvatarSpec:
    """The bundled portrait, used whenever nobody supplied one."""
    return AvatarSpec(image=load_image(default_portrait_path()), prompt=prompt, seed=seed)


@dataclass
class AudioCues:
    """What one video frame's slice of audio says about the mouth."""

    level: float  # 0 (silence) .. 1 (loud speech)
    brightness: float  # spectral centroid in Hz
    noisiness: float  # zero-crossing rate, 0..1


def audio_cues(samples: np.ndarray, sample_rate: int) -> AudioCues:
    """Loudness, spectral centroid and zero-crossing rate of one frame's samples."""
    x = samples.astype(np.float32, copy=False)
    rms = float(np.sqrt(np.mean(x * x) + 1e-12))
    db = 20.0 * math.log10(rms + 1e-9)
    level = min(1.0, max(0.0, (db + 52.0) / 40.0))
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)).astype(np.float32)))
    freqs = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    centroid = float((spectrum * freqs).sum() / (spectrum.sum() + 1e-9))
    zcr = float(np.mean(np.signbit(x[1:]) != np.signbit(x[:-1]))) if len(x) > 1 else 0.0
    return AudioCues(level, centroid, zcr)


@dataclass(eq=False)
class PreviewState:
    """Everything one session's preview avatar remembers between blocks."""

    spec: AvatarSpec
    size: Size
    rig: FaceRig
    rng: np.random.Generator
    phases: np.ndarray
    frame: int = 0
    jaw: float = 0.0
    width: float = 0.0
    speaking: float = 0.0  # slow envelope of speech activity; livens up head motion while talking
    blink_start: int = -100
    next_blink: int = 0
    pending: AvatarSpec | None = None


class PreviewGenerator(Generator):
    """Audio-driven portrait animation on one CPU core; per-session state lives in `PreviewState`."""

    name = "preview"
    worker_threads = 2
    cpu_bound = True

    def __init__(self, fps: int = 25, frames_per_block: int = 12, sample_rate: int = 16_000) -> None:
        self.fps = fps
        self.frames_per_block = frames_per_block
        self.sample_rate = sample_rate

    def open(self, spec: AvatarSpec, size: Size) -> PreviewState:
        rng = np.random.default_rng(spec.seed)
        state = PreviewState(
            spec=spec,
            size=size,
            rig=build_rig(spec, size),
            rng=rng,
            phases=rng.uniform(0, 2 * math.pi, 6),
        )
        state.next_blink = self._blink_interval(state) // 2
        log.info("preview session opened at %s (seed %d)", size, spec.seed)
        return state

    def poster(self, state: PreviewState) -> np.ndarray:
        frame = np.empty((state.size.height, state.size.width, 3), np.uint8)
        state.rig.render(FacePose(), frame)  # the portrait at rest: where the first block starts from
        return frame

    def switch(self, state: PreviewState, spec: AvatarSpec) -> None:
        state.pending = spec

    def step(self, state: PreviewState, window: AudioWindow) -> np.ndarray:
        samples = window.samples
        if len(samples) != self.audio_samples_per_block:
            raise ValueError(f"window has {len(samples)} samples, expected {self.audio_samples_per_block}")
        if state.pending is not None:
            state.spec, state.pending = state.pending, None
            state.rig = build_rig(state.spec, state.size)
        frames = np.empty((self.frames_per_block, state.size.height, state.size.width, 3), np.uint8)
        per_frame = len(samples) // self.frames_per_block
        for i in range(self.frames_per_block):
            cues = audio_cues(samples[i * per_frame : (i + 1) * per_frame], self.sample_rate)
            state.rig.render(self._pose(state, cues, window.speech), frames[i])
            state.frame += 1
        return frames

    def _pose(self, state: PreviewState, cues: AudioCues, speech: bool) -> FacePose:
        """Advance the articulators by one frame and return the pose to draw."""
        hiss = min(1.0, max(0.0, (cues.brightness - 3000.0) / 2500.0 + (cues.noisiness - 0.3)))
        jaw_target = (cues.level**1.3) * (1.0 - 0.6 * hiss) * (1.0 if speech else 0.3)
        width_target = 0.0
        if cues.level > 0.15:
            width_target = min(1.0, max(-1.0, (cues.brightness - 1400.0) / 900.0))
        state.jaw += (jaw_target - state.jaw) * (0.6 if jaw_target > state.jaw else 0.35)
        state.width += (width_target - state.width) * 0.3
        state.speaking += ((1.0 if speech and cues.level > 0.1 else 0.0) - state.speaking) * 0.06

        t = state.frame / self.fps
        p = state.phases
        scale = state.rig.face.w / 100.0
        sway = math.sin(2 * math.pi * 0.21 * t + p[0]) + 0.6 * math.sin(2 * math.pi * 0.57 * t + p[1])
        breath = math.sin(2 * math.pi * 0.25 * t + p[2])
        nod = state.speaking * 0.012 * math.sin(2 * math.pi * 1.1 * t + p[3]) + 0.004 * breath
        return FacePose(
            roll=(0.005 + 0.01 * state.speaking) * sway,
            shift_x=scale * (0.8 + 1.5 * state.speaking) * math.sin(2 * math.pi * 0.13 * t + p[4]),
            shift_y=scale * 0.7 * breath,
            nod=nod,
            jaw=state.jaw,
            width=state.width,
            blink=self._blink(state),
        )

    def _blink(self, state: PreviewState) -> float:
        if state.frame >= state.next_blink:
            state.blink_start = state.frame
            state.next_blink = state.frame + self._blink_interval(state)
        k = state.frame - state.blink_start
        return BLINK_PROFILE[k] if 0 <= k < len(BLINK_PROFILE) else 0.0

    def _blink_interval(self, state: PreviewState) -> int:
        """Frames until the next blink: people blink every 2-6 s, now and then in quick pairs."""
        if state.rng.random() < 0.12:
            return len(BLINK_PROFILE) + int(state.rng.integers(2, 6))
        return int(self.fps * state.rng.uniform(2.0, 6.0))


def build_rig(spec: AvatarSpec, size: Size) -> FaceRig:
    """Fit the portrait to the output size around its face and precompute the warp. The face is the one
    the spec carries (found on the whole portrait before any crop), else found here on `spec.image`, which
    is then the whole portrait (live sessions and switches hand over the uploaded image uncropped)."""
    face = FaceBox(*spec.face) if spec.face is not None else find_face(spec.image, "the portrait")
    image, face = fit_portrait(spec.image, face, size.width, size.height)
    return FaceRig(image, face)
