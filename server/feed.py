"""A session's input side: mic or pushed PCM -> segmenter -> windows waiting for the generator.

Every window remembers where its audio sits in the session's 16 kHz input stream, when that audio
arrived (for the lag figure) and which pushed utterances it carries (for `started` / `finished`).
`interrupt()` bumps an epoch: windows, and blocks generated from windows, of an older epoch are
dropped wherever they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from liveavatar.generator import AudioWindow
from server.protocol import ProtocolError
from server.segmenter import Segmenter, VadEvent

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Utterance:
    """One pushed utterance: everything pushed between two `push_end`s (or interrupts)."""

    id: int
    first_arrival: float
    intervals: list[tuple[int, int]] = field(default_factory=list)
    """Input-stream sample ranges holding its audio (idle padding may sit between them)."""
    ended: bool = False
    started: bool = False
    interrupted: bool = False
    finished: bool = False
    played: int = 0

    @property
    def end(self) -> int:
        return self.intervals[-1][1] if self.intervals else 0

    def overlap(self, start: int, stop: int) -> int:
        return sum(max(0, min(stop, b) - max(start, a)) for a, b in self.intervals)

    def offset_of(self, sample: int) -> int | None:
        """Samples of this utterance before stream position `sample` (None if it is not inside)."""
        if not any(a <= sample < b for a, b in self.intervals):
            return None
        return self.overlap(self.intervals[0][0], sample)


@dataclass(eq=False)
class WindowItem:
    window: AudioWindow
    start: int
    epoch: int
    arrival: float | None
    """When the first sample arrived (monotonic); None where a lag figure would mean nothing."""
    utterances: list[Utterance]

    @property
    def preemptible(self) -> bool:
        """Idle motion may be cut short; speech and anything pushed must play in full."""
        return not self.window.speech and not self.utterances


class AudioFeed:
    """Turns input PCM into a bounded queue of windows for the session's generation loop."""

    def __init__(
        self,
        segmenter: Segmenter,
        on_vad: Callable[[VadEvent, float], None],
        max_push_seconds: float = 120.0,
        max_pending_windows: int = 4,
    ) -> None:
        self.segmenter = segmenter
        self.rate = segmenter.sample_rate
        self.block = segmenter.samples_per_block
        self.on_vad = on_vad
        self.max_push_samples = int(max_push_seconds * self.rate)
        self.max_pending = max_pending_windows
        self.epoch = 0
        self.dropped_windows = 0
        self.last_input: float | None = None
        self.utterances: list[Utterance] = []
        self._open: Utterance | None = None
        self._next_id = 1
        self._pending: deque[WindowItem] = deque()
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=4096)  # (stream end, arrival)
        self._new = asyncio.Event()
        self.mic_origin: int | None = None
        """Stream position of the first mic sample: the idle blocks before it cover connection set-up, so
        VAD times (`at`, in stream seconds) are at least this much later than the same moment in the mic's
        audio (idle blocks made while the mic stalls add to it). None: no mic audio yet (or push mode)."""

    @property
    def _mic(self) -> bool:
        """Mic audio has arrived: its windows drop idle ones and carry arrival times."""
        return self.mic_origin is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_samples(self) -> int:
        return len(self._pending) * self.block + self.segmenter.position % self.block

    def arrival(self, sample: int) -> float | None:
        """Arrival time of the chunk that carried `sample` (None when it is too old to know)."""
        found = None
        for end, t in reversed(self._arrivals):  # recent samples are the ones asked about
            if end <= sample:
                break
            found = t
        return found

    # ---- input ----------------------------------------------------------------------------------

    def feed_mic(self, pcm: np.ndarray, now: float | None = None) -> None:
        """Real-time microphone audio: windows come out every block as it arrives."""
        now = time.monotonic() if now is None else now
        if self.mic_origin is None:
            self.mic_origin = self.segmenter.position
        self.last_input = now
        self._arrivals.append((self.segmenter.position + len(pcm), now))
        self._ingest(self.segmenter.push(pcm), now)

    def mic_gap(self, seconds: float, now: float | None = None) -> None:
        """No mic audio arrived for `seconds`: silence, as far as the VAD is concerned, so an open
        utterance ends with `speech_end`. Once none is open, idle windows take over and nothing is fed;
        if one of them closed the utterance, its `speech_end` (held for the next push) comes out now."""
        if not self._mic:
            return
        if self.segmenter.in_speech:
            self.feed_mic(np.zeros(round(seconds * self.rate), np.int16), now)
        else:
            self._ingest(self.segmenter.push(np.zeros(0, np.int16)), time.monotonic() if now is None else now)

    def push(self, pcm: np.ndarray, now: float | None = None) -> Utterance:
        """Pushed audio joins the open utterance (a new one starts after push_end or interrupt)."""
        now = time.monotonic() if now is None else now
        self.check_push(len(pcm))
        utt = self.record_push(self.segmenter.position, len(pcm), now)
        self.ingest(self.segmenter.push(pcm), now)
        return utt

    # The session splits `push` in three so that the costly middle part (VAD and block cutting of a
    # large push) can run in a worker thread: `check_push` and `record_push` on the event loop, then
    # `segmenter.push` in the thread (nothing else touches the segmenter meanwhile), then `ingest`.

    def check_push(self, samples: int) -> None:
        """Refuse a push of `samples` that would queue more than `max_push_seconds`."""
        if self.pending_samples() + samples > self.max_push_samples:
            raise ProtocolError("push_buffer_full", f"more than {self.max_push_samples / self.rate:.0f} s queued")

    def record_push(self, start: int, samples: int, now: float) -> Utterance:
        """Book `samples` pushed at stream position `start` to the open utterance (opening one)."""
        utt = self._open
        if utt is None:
            utt = self._open = Utterance(self._next_id, now)
            self._next_id += 1
            self.utterances.append(utt)
        if samples:
            if utt.intervals and utt.intervals[-1][1] == start:
                utt.intervals[-1] = (utt.intervals[-1][0], start + samples)
            else:
                utt.intervals.append((start, start + samples))
        self._arrivals.append((start + samples, now))
        return utt

    def ingest(self, produced: list[AudioWindow | VadEvent], now: float) -> None:
        """What the segmenter returned for pushed audio: VAD events reported, windows queued."""
        self._ingest(produced, now)

    def push_end(self) -> Utterance | None:
        """Close the open utterance; its last partial block is padded with silence and queued."""
        utt, self._open = self._open, None
        if utt is None:
            return None
        utt.ended = True
        if not utt.intervals:  # nothing was pushed: it is over at once
            utt.finished = True
            self.utterances.remove(utt)
            return utt
        if self.segmenter.position % self.block:
            self._ingest(self.segmenter.flush(), time.monotonic())
        return utt

    def idle(self) -> WindowItem:
        """A window for when nothing is queued; completes a partial pushed block with silence."""
        window = self.segmenter.idle_window()
        return self._item(window, time.monotonic(), synthesized=True)

    def interrupt(self) -> list[Utterance]:
        """Forget all queued audio; returns the utterances that were cut."""
        self.epoch += 1
        self._pending.clear()
        if self.segmenter.position % self.block:
            self.segmenter.idle_window()  # flush the partial block out of the stream and drop it
        self._open = None
        cut = [u for u in self.utterances if not u.finished]
        for u in cut:
            u.ended = u.interrupted = True
        return cut

    # ---- output ---------------------------------------------------------------------------------

    def pop(self) -> WindowItem | None:
        return self._pending.popleft() if self._pending else None

    async def wait(self, timeout: float) -> None:
        """Until a window is queued or `timeout` passes.

        `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` returns normally when its inner wait
        ends in the same loop turn as a cancellation, which eats the cancel (a push then a stop at once
        left the generation loop running and `Session.close` waiting for it)."""
        if self._pending:
            return
        self._new.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._new.wait()

    def locate(self, sample: int) -> tuple[Utterance, int] | None:
        """The pushed utterance holding stream position `sample`, and the offset into it."""
        for utt in self.utterances:
            offset = utt.offset_of(sample)
            if offset is not None:
                return utt, offset
        return None

    def mic_live(self, now: float, silence_s: float = 0.3) -> bool:
        """True while mic audio keeps arriving, i.e. the mic's own windows will keep the clock fed."""
        return self._mic and self.last_input is not None and now - self.last_input < silence_s

    def _ingest(self, produced: list[AudioWindow | VadEvent], now: float) -> None:
        for item in produced:
            if isinstance(item, VadEvent):
                self.on_vad(item, self.arrival(item.sample) or now)
            else:
                self._enqueue(self._item(item, now, synthesized=False))

    def _item(self, window: AudioWindow, now: float, synthesized: bool) -> WindowItem:
        start = window.index * self.block
        stop = start + self.block
        utts = [u for u in self.utterances if not u.finished and u.overlap(start, stop)]
        if self._mic and not synthesized:
            arrival = self.arrival(start)
        else:  # pushed audio waits in a queue by design: only an utterance's first block has a lag
            firsts = [u.first_arrival for u in utts if start <= u.intervals[0][0] < stop]
            arrival = firsts[0] if firsts else None
        return WindowItem(window, start, self.epoch, arrival, utts)

    def _enqueue(self, item: WindowItem) -> None:
        self._pending.append(item)
        # Mic audio outpacing the generator: drop idle windows first, then the oldest of any kind,
        # so the lag stays bounded instead of growing for ever.
        while len(self._pending) > self.max_pending and self._mic:
            idle = next((w for w in self._pending if w.preemptible), None)
            self._pending.remove(idle if idle is not None else self._pending[0])
            self.dropped_windows += 1
            log.warning("generator behind real time: dropped a window (%d so far)", self.dropped_windows)
        self._new.set()
