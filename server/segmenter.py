"""Cuts a live 16 kHz PCM stream into generator blocks and tells speech from silence.

A voice activity detector (webrtcvad unless another `VoiceActivityDetector` is given, server/vad.py)
decides per 20 ms frame; its raw decisions flicker, so they are smoothed: an utterance starts
when most of the last `start_ms` were voiced (the onset is dated back to the first voiced frame of that
run) and ends after `hangover_ms` of mostly unvoiced frames, so short gaps between words stay inside one
utterance. Every sample ends up in exactly one window, in order: windows carry the real audio whether
or not it is speech (the session plays that audio back in sync), and the `speech` flag says what the
VAD heard. Windows are emitted as soon as their last sample arrives; smoothing never delays them.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from liveavatar.generator import AudioWindow
from server.vad import VoiceActivityDetector, WebRtcVad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VadEvent:
    """An utterance boundary; `sample` is its position in the session's 16 kHz stream."""

    kind: Literal["speech_start", "speech_end"]
    sample: int

    def seconds(self, sample_rate: int = 16_000) -> float:
        return self.sample / sample_rate


class Segmenter:
    """Per-session VAD + block cutter: `push()` PCM chunks of any size, get windows and events back."""

    def __init__(
        self,
        sample_rate: int = 16_000,
        samples_per_block: int = 7_680,
        vad_mode: int = 2,
        context_samples: int = 16_000 * 2,
        frame_ms: int = 20,
        start_ms: int = 200,
        start_ratio: float = 0.6,
        hangover_ms: int = 500,
        end_ratio: float = 0.15,
        min_level_dbfs: float = -55.0,
        vad: VoiceActivityDetector | None = None,
    ) -> None:
        """`vad`: the per-frame detector; None: webrtcvad at aggressiveness `vad_mode` (which only
        that default uses). Frames quieter than `min_level_dbfs` are silence whatever it says."""
        detector: VoiceActivityDetector = WebRtcVad(vad_mode) if vad is None else vad
        name = type(detector).__name__
        if sample_rate not in detector.sample_rates:
            raise ValueError(f"{name} judges {'/'.join(map(str, detector.sample_rates))} Hz audio, not {sample_rate}")
        if frame_ms not in detector.frame_ms:
            raise ValueError(f"{name} judges frames of {'/'.join(map(str, detector.frame_ms))} ms, not {frame_ms}")
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * frame_ms // 1000
        if samples_per_block % self.frame_samples:
            raise ValueError(f"a block ({samples_per_block}) must hold whole {frame_ms} ms VAD frames")
        self.samples_per_block = samples_per_block
        self.context_samples = context_samples
        self._vad = detector
        # Frames quieter than this are silence whatever the VAD says: webrtcvad in its aggressive modes
        # still fires on faint hiss, and a mouth moving to room noise looks wrong.
        self._min_mean_square = (32768.0 * 10 ** (min_level_dbfs / 20)) ** 2
        self._start_ring: deque[bool] = deque(maxlen=max(1, start_ms // frame_ms))
        self._end_ring: deque[bool] = deque(maxlen=max(1, hangover_ms // frame_ms))
        self._start_ratio = start_ratio
        self._end_ratio = end_ratio
        self._in_speech = False
        self._last_voiced_end = 0  # stream position just after the latest voiced frame
        self._pending = np.zeros(0, np.int16)  # samples of the current, incomplete block
        self._block_flags: list[bool] = []  # smoothed speech state of each frame of the current block
        self._history = np.zeros(0, np.float32)  # up to context_samples before the current block
        self._position = 0  # stream position of the first sample of the current block
        self._index = 0
        self._queued_events: list[VadEvent] = []

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def position(self) -> int:
        """Samples consumed so far (the stream position of the next sample pushed)."""
        return self._position + len(self._pending)

    @property
    def blocks_emitted(self) -> int:
        return self._index

    def push(self, pcm: np.ndarray | bytes) -> list[AudioWindow | VadEvent]:
        """Feed mono int16 PCM (array or raw little-endian bytes); returns what became complete, in order."""
        chunk = np.frombuffer(pcm, np.int16) if isinstance(pcm, bytes | bytearray | memoryview) else pcm
        if chunk.dtype != np.int16:
            raise TypeError(f"Segmenter.push takes int16 PCM, got {chunk.dtype}")
        out: list[AudioWindow | VadEvent] = list(self._queued_events)
        self._queued_events.clear()
        done = len(self._block_flags) * self.frame_samples  # samples of _pending already judged
        self._pending = np.concatenate([self._pending, chunk.reshape(-1)])
        while len(self._pending) - done >= self.frame_samples:
            frame = self._pending[done : done + self.frame_samples]
            event = self._judge(frame, self._position + done)
            if event is not None:
                out.append(event)
            done += self.frame_samples
            if done == self.samples_per_block:
                out.append(self._cut_block())
                done = 0
        return out

    def flush(self) -> list[AudioWindow | VadEvent]:
        """End of input: pad the partial block with silence and close an open utterance."""
        out: list[AudioWindow | VadEvent] = []
        if len(self._pending):
            missing = -len(self._pending) % self.samples_per_block
            out.extend(self.push(np.zeros(missing, np.int16)))
        out.extend(self._queued_events)
        self._queued_events.clear()
        if self._in_speech:
            out.append(self._end_utterance())
        return out

    def idle_window(self) -> AudioWindow:
        """A block of silence for when no input exists (push mode between utterances).

        Any partial block already pushed is completed with silence rather than dropped, so nothing is
        reordered; an utterance still open is closed and its `speech_end` comes out of the next `push()`.
        """
        before = self._index
        missing = self.samples_per_block - len(self._pending)
        produced = self.push(np.zeros(missing, np.int16))
        windows = [item for item in produced if isinstance(item, AudioWindow)]
        self._queued_events.extend(item for item in produced if isinstance(item, VadEvent))
        if self._in_speech:
            self._queued_events.append(self._end_utterance())
        assert len(windows) == 1 and self._index == before + 1
        return windows[0]

    def _judge(self, frame: np.ndarray, start: int) -> VadEvent | None:
        """Run the VAD on one frame, update the smoothed state; return an event if one happened."""
        loud = float(np.mean(frame.astype(np.float32) ** 2)) >= self._min_mean_square
        voiced = loud and self._vad.is_speech(frame.tobytes(), self.sample_rate)
        if voiced:
            self._last_voiced_end = start + self.frame_samples
        self._start_ring.append(voiced)
        self._end_ring.append(voiced)
        event = None
        if not self._in_speech:
            ring = self._start_ring
            if len(ring) == ring.maxlen and sum(ring) >= self._start_ratio * ring.maxlen:
                first = next(i for i, v in enumerate(ring) if v)
                onset = start - (len(ring) - 1 - first) * self.frame_samples
                self._in_speech = True
                self._end_ring.clear()
                self._end_ring.extend(ring)
                self._mark_from(onset, True)
                event = VadEvent("speech_start", onset)
                log.debug("speech starts at %.2f s", onset / self.sample_rate)
        else:
            ring = self._end_ring
            if len(ring) == ring.maxlen and sum(ring) <= self._end_ratio * ring.maxlen:
                event = self._end_utterance()
                self._mark_from(event.sample, False)
        self._block_flags.append(self._in_speech)
        return event

    def _end_utterance(self) -> VadEvent:
        self._in_speech = False
        self._start_ring.clear()
        log.debug("speech ends at %.2f s", self._last_voiced_end / self.sample_rate)
        return VadEvent("speech_end", self._last_voiced_end)

    def _mark_from(self, sample: int, speech: bool) -> None:
        """Re-label already judged frames of the current block from `sample` on (onset/offset dating)."""
        first = max(0, (sample - self._position) // self.frame_samples)
        for i in range(first, len(self._block_flags)):
            self._block_flags[i] = speech

    def _cut_block(self) -> AudioWindow:
        block = self._pending[: self.samples_per_block].astype(np.float32) / 32768.0
        window = AudioWindow(
            samples=block,
            context=self._history.copy(),
            speech=any(self._block_flags),
            index=self._index,
        )
        joined = np.concatenate([self._history, block])
        self._history = joined[max(0, len(joined) - self.context_samples) :]
        self._pending = self._pending[self.samples_per_block :]
        self._block_flags = []
        self._position += self.samples_per_block
        self._index += 1
        return window
