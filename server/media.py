"""One media clock per avatar stream: the timeline its transport reads synchronised frames and audio from.

Why one clock: if each track paced itself with its own sleeps (as aiortc's examples do), their
timelines would drift apart and lips would lose the sound over minutes. Here the clock cuts time
into *slots* of one video frame (40 ms at 25 fps). Slot `n` holds one image and the 1920 audio samples
(48 kHz) that go with it, is due at `t0 + n / fps`, and is filled once — by whichever track asks
first — from the queue of generated blocks, or with filler (last image, silence) when generation is
late. The video frame of slot n gets pts `n * 3600` (90 kHz) and its audio the 20 ms frames with pts
`(2n, 2n+1) * 960` (48 kHz): both tracks present the same content at the same media time, by
construction.

Generated blocks wait in a short queue (back-pressure on the generator). Blocks marked preemptible
(idle) give way to the next real one, even mid-block, so speech is never delayed behind idle motion.
A block may carry a deadline (live mic input: arrival + target lag); when it starts later than that
by more than `trim_after`, its first frames (and their audio) are skipped. Without that, every late
block would add its delay to all the blocks after it, and the lag of a long utterance would creep.
A block of silence may also carry earlier catch-up deadlines, which skip frames only while media is
queued behind it (a skip then gives lag back instead of leaving empty slots).

When generation is late after an idle block (the worker serves speech first, or is slower than real
time), the filler slots play that block's frames backwards and forwards ("bounce") with silence, so an
idle avatar keeps moving instead of freezing. After a speech block the last image is held: moving
lips without their sound would be worse than a short hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

AUDIO_RATE = 48_000
AUDIO_FRAME_SAMPLES = 960  # 20 ms, the Opus frame
VIDEO_CLOCK_RATE = 90_000


@dataclass(eq=False)
class Block:
    """One generated block: frames plus the audio that plays with them, and the session's notes."""

    frames: np.ndarray
    """uint8 [F, H, W, 3]"""
    audio: np.ndarray
    """int16 mono at AUDIO_RATE, exactly F * samples_per_slot long"""
    preemptible: bool = False
    meta: Any = None
    deadlines: list[float] | None = None
    """Per frame, the monotonic time by which it would have to start playing to be within the lag bound
    (live mic audio): the clock starts the block at its first frame that still makes it, and the rest
    follow at the clock's pace. None: whenever it comes (pushed audio, idle blocks made on demand)."""
    catch_up: list[float] | None = None
    """Per frame, an earlier deadline (the catch-up target) that only counts while later media is queued
    behind this block: skipping then brings that media forward and so gives a lag back. With nothing
    queued the generator is what is late, and a skip would only leave empty slots."""
    bound: float | None = None
    """The lag bound (seconds) the deadlines were made with, reported with this block's lag."""
    first: int = 0
    """Set by the clock: frames skipped at the start because the block was late."""


class Slot(NamedTuple):
    image: np.ndarray
    audio: np.ndarray


BlockCallback = Callable[[Block, float, int], None]
"""(block, monotonic time the slot is due, frame index): on start the first frame shown and its slot;
on end one past the last frame shown, and the last slot."""


class MediaClock:
    """The per-session timeline: both tracks read slots from here; the session puts blocks in."""

    def __init__(
        self,
        fps: int,
        blank: np.ndarray,
        max_blocks: int = 2,
        on_block_start: BlockCallback | None = None,
        on_block_end: BlockCallback | None = None,
        history_slots: int = 64,
    ) -> None:
        if AUDIO_RATE % fps or (AUDIO_RATE // fps) % AUDIO_FRAME_SAMPLES:
            raise ValueError(f"{fps} fps does not split into whole 20 ms audio frames")
        self.fps = fps
        self.slot_seconds = 1.0 / fps
        self.samples_per_slot = AUDIO_RATE // fps
        self.max_blocks = max_blocks
        self.on_block_start = on_block_start
        self.on_block_end = on_block_end
        self.t0: float | None = None
        self.filler_slots = 0
        self.trimmed_frames = 0
        self.dropped_late_blocks = 0
        self.history_slots = history_slots
        self._queue: deque[Block] = deque()
        self._current: Block | None = None
        self._pos = 0  # frames of the current block already placed in slots
        self._next_slot = 0
        self._slots: dict[int, Slot] = {}
        self._last_image = self._blank = blank
        self._bounce: np.ndarray | None = None  # frames of the last idle block shown, for filler
        self._bounce_k = 0
        self._silence = np.zeros(self.samples_per_slot, np.int16)
        self._space = asyncio.Event()
        self._closed = False

    # ---- time ---------------------------------------------------------------------------------

    def show_until_first_block(self, image: np.ndarray) -> None:
        """The filler before any block has played (the avatar's poster instead of black)."""
        if self._last_image is self._blank and image.shape == self._blank.shape:
            self._last_image = image

    def ensure_started(self) -> float:
        """The clock starts when the first track asks for media, i.e. when the peer is connected."""
        if self.t0 is None:
            self.t0 = time.monotonic()
        return self.t0

    def due(self, slot: int) -> float:
        return self.ensure_started() + slot * self.slot_seconds

    def current_slot(self) -> int:
        return int((time.monotonic() - self.ensure_started()) / self.slot_seconds)

    async def sleep_until(self, when: float) -> None:
        delay = when - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    # ---- producer side --------------------------------------------------------------------------

    # Callable[..., bool], though called with no arguments: callers bind the epoch as a lambda default,
    # which mypy cannot match to Callable[[], bool] (python/mypy#15459)
    async def put(self, block: Block, valid: Callable[..., bool] | None = None) -> None:
        """Queue a block, waiting while `max_blocks` are already queued; a real block preempts idle ones.

        `valid` is asked again after the wait: an interrupt may have made the block obsolete meanwhile.
        """
        expected = len(block.frames) * self.samples_per_slot
        if block.audio.shape != (expected,):
            raise ValueError(f"block audio has {block.audio.shape} samples, expected ({expected},)")
        if not block.preemptible:
            self._preempt()
        while len(self._queue) >= self.max_blocks and not self._closed:
            self._space.clear()
            await self._space.wait()
        if self._closed or (valid is not None and not valid()):
            return
        if not block.preemptible:
            self._preempt()
        self._queue.append(block)

    def buffered_seconds(self) -> float:
        """Media ahead of the playhead; negative when the tracks are already waiting on the generator."""
        frames = sum(len(b.frames) for b in self._queue)
        if self._current is not None:
            frames += len(self._current.frames) - self._pos
        if self.t0 is None:
            return frames * self.slot_seconds
        return frames * self.slot_seconds + self.due(self._next_slot) - time.monotonic()

    @property
    def playing(self) -> Block | None:
        """The block whose frames are going out now (None between blocks)."""
        return self._current

    def end_of_playing(self) -> int:
        """The slot after the last frame of the block on screen (the next slot between blocks): where
        sound stops when an interrupt drops everything queued."""
        left = len(self._current.frames) - self._pos if self._current is not None else 0
        return self._next_slot + left

    @property
    def queued_blocks(self) -> int:
        return len(self._queue) + (self._current is not None)

    def flush(self) -> list[Block]:
        """Drop every block not yet started (interrupt); the playing one finishes its block."""
        dropped = list(self._queue)
        self._queue.clear()
        self._space.set()
        return dropped

    def close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._current = None
        self._slots.clear()
        self._space.set()

    def _preempt(self) -> None:
        kept = deque(b for b in self._queue if not b.preemptible)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._space.set()
        cur = self._current
        if cur is not None and cur.preemptible:
            self._current = None
            self._finished(cur)
            self._emit(self.on_block_end, cur, self._next_slot - 1, self._pos)

    # ---- consumer side --------------------------------------------------------------------------

    def slot(self, n: int) -> Slot | None:
        """Slot n's content, filling every slot up to n on first request; None if n fell out of history."""
        self.ensure_started()
        while self._next_slot <= n:
            self._fill_next()
        return self._slots.get(n)

    def _fill_next(self) -> None:
        idx = self._next_slot
        block: Block | None
        while self._current is None and self._queue:
            block = self._queue.popleft()
            self._space.set()
            block.first = self._frames_to_trim(block, idx)
            self.trimmed_frames += block.first
            if block.first == len(block.frames):  # every frame past its deadline: none of it plays
                self.dropped_late_blocks += 1
                continue
            self._current, self._pos = block, block.first
            self._emit(self.on_block_start, block, idx, block.first)
        block = self._current
        if block is None:
            self.filler_slots += 1
            slot = Slot(self._filler_image(), self._silence)
        else:
            p, sps = self._pos, self.samples_per_slot
            slot = Slot(block.frames[p], block.audio[p * sps : (p + 1) * sps])
            self._last_image = slot.image
            self._pos += 1
            if self._pos == len(block.frames):
                self._current = None
                self._finished(block)
                self._emit(self.on_block_end, block, idx, self._pos)
        self._slots[idx] = slot
        self._slots.pop(idx - self.history_slots, None)
        self._next_slot += 1

    def _finished(self, block: Block) -> None:
        """Remember an idle block's shown frames for bouncing; a speech block stops the bounce."""
        shown = block.frames[block.first : self._pos]
        self._bounce = shown if block.preemptible and len(shown) >= 2 else None
        self._bounce_k = 0

    def _filler_image(self) -> np.ndarray:
        frames = self._bounce
        if frames is None:
            return self._last_image
        self._bounce_k += 1
        last = len(frames) - 1
        m = self._bounce_k % (2 * last)
        self._last_image = frames[last - (m if m <= last else 2 * last - m)]
        return self._last_image

    def _frames_to_trim(self, block: Block, slot: int) -> int:
        """Frames to skip so the first one shown, in `slot`, is within its deadline (all of them when
        none is): the lag bound holds for every block that plays, with no tolerance. The catch-up
        deadlines skip more, but never more frames than are queued behind the block."""
        due, frames = self.due(slot), len(block.frames)

        def late(deadlines: list[float]) -> int:  # frames before the first one due in time
            return next((k for k, deadline in enumerate(deadlines) if due <= deadline), frames)

        trim = 0 if block.deadlines is None else late(block.deadlines)
        queued = sum(len(b.frames) for b in self._queue)
        if block.catch_up is not None and queued:
            trim = max(trim, min(late(block.catch_up), queued, frames - 1))  # the last frame stays: no empty block
        return trim

    def _emit(self, callback: BlockCallback | None, block: Block, slot: int, frame: int) -> None:
        if callback is None:
            return
        try:
            callback(block, self.due(slot), frame)
        except Exception:
            log.exception("block callback failed")


class Upsampler:
    """16 kHz -> 48 kHz for the outgoing audio: a windowed-sinc polyphase filter with state kept
    between blocks, so consecutive blocks join without clicks and every block maps to exactly
    3x its samples (the clock needs exact lengths; libswresample's output length varies per call)."""

    def __init__(self, factor: int = 3, taps_per_phase: int = 16) -> None:
        n = factor * taps_per_phase
        t = (np.arange(n) - (n - 1) / 2) / factor
        h = np.sinc(t) * np.kaiser(n, 8.0)
        self.factor = factor
        self._h = (h * factor / h.sum()).astype(np.float32)
        self._tail = np.zeros(n - 1, np.float32)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """float32 [-1, 1] at the input rate -> int16 at factor x the rate."""
        stuffed = np.zeros(len(samples) * self.factor, np.float32)
        stuffed[:: self.factor] = samples
        joined = np.concatenate([self._tail, stuffed])
        self._tail = joined[len(joined) - len(self._tail) :]
        out = np.convolve(joined, self._h, mode="valid")
        return np.clip(np.round(out * 32767.0), -32768, 32767).astype(np.int16)
