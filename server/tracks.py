"""The WebRTC media tracks: video and audio read from an avatar stream's media clock (server/media.py).

Both tracks read the same slots, so the video frame of slot n (pts `n * 3600` at 90 kHz) and its audio
(pts `(2n, 2n+1) * 960` at 48 kHz) present the same content at the same media time, by construction.
"""

from __future__ import annotations

import fractions
import logging
from collections.abc import Callable

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from server.media import AUDIO_FRAME_SAMPLES, AUDIO_RATE, VIDEO_CLOCK_RATE, MediaClock

log = logging.getLogger(__name__)


class ClockVideoTrack(MediaStreamTrack):
    """Video from the session clock; skips ahead (dropping frames) when the encoder falls behind."""

    kind = "video"

    def __init__(
        self,
        clock: MediaClock,
        max_late_slots: int = 3,
        on_frame: Callable[[int], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ):
        super().__init__()
        self.clock = clock
        self.max_late_slots = max_late_slots
        self.on_frame = on_frame
        self.on_drop = on_drop
        self.dropped = 0
        self._next = 0
        self._step = VIDEO_CLOCK_RATE // clock.fps

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        clock = self.clock
        clock.ensure_started()
        n = self._next
        behind = clock.current_slot() - n
        if behind > self.max_late_slots:
            n += behind
            self.dropped += behind
            if self.on_drop:
                self.on_drop(behind)
        await clock.sleep_until(clock.due(n))
        slot = clock.slot(n)
        if slot is None or self.readyState != "live":
            raise MediaStreamError
        self._next = n + 1
        frame = VideoFrame.from_ndarray(slot.image, format="rgb24")
        frame.pts = n * self._step
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        if self.on_frame:
            self.on_frame(n)
        return frame


class ClockAudioTrack(MediaStreamTrack):
    """48 kHz mono audio from the session clock, 20 ms per frame. Unlike the video it does not skip
    when its sender falls behind (a starved CPU, a video encode holding the loop): the late frames go
    out at once, in a burst the receiver's jitter buffer absorbs, so the sound stays whole and every
    frame keeps its media time (the video's, by the clock's slots). Only a sender more than
    `max_late_frames` behind (2 s: a process stalled, not merely busy) skips ahead, so that it never
    asks for slots the clock no longer keeps."""

    kind = "audio"

    def __init__(self, clock: MediaClock, max_late_frames: int = 100, on_frame: Callable[[int], None] | None = None):
        super().__init__()
        per_slot = clock.samples_per_slot // AUDIO_FRAME_SAMPLES
        if max_late_frames >= (clock.history_slots - 2) * per_slot:
            raise ValueError(
                f"max_late_frames {max_late_frames} reaches past the clock's {clock.history_slots} slots of history"
            )
        self.clock = clock
        self.max_late_frames = max_late_frames
        self.skipped = 0
        self.on_frame = on_frame
        self._next = 0
        self._per_slot = clock.samples_per_slot // AUDIO_FRAME_SAMPLES

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        clock = self.clock
        clock.ensure_started()
        k = self._next
        behind = clock.current_slot() * self._per_slot - k
        if behind > self.max_late_frames:  # the pts jump moves the Opus RTP clock along with it
            log.warning("audio sender %d frames behind; skipping them", behind)
            k += behind
            self.skipped += behind
        await clock.sleep_until(clock.ensure_started() + k * AUDIO_FRAME_SAMPLES / AUDIO_RATE)
        n, part = divmod(k, self._per_slot)
        slot = clock.slot(n)
        if slot is None or self.readyState != "live":
            raise MediaStreamError
        self._next = k + 1
        samples = slot.audio[part * AUDIO_FRAME_SAMPLES : (part + 1) * AUDIO_FRAME_SAMPLES]
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = k * AUDIO_FRAME_SAMPLES
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        if self.on_frame:
            self.on_frame(k)
        return frame
