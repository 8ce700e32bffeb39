"""The avatar stream: one session's avatar, apart from any transport (docs/architecture.md, "Avatar
stream and transport").

Audio comes in (mic PCM with its arrival times, or pushed PCM, push_end, interrupt), and so do avatar
switches; synchronised frames and audio go out on the stream's `MediaClock`, which the transport reads
slot by slot; events (`speech`, `started`, `finished`, `switched`, `stats`, `error`) go back through one
callback. The stream never sees a network: the WebRTC transport (server/webrtc.py) and the tests'
in-process transport (tests/in_process_transport.py) both drive it through the same methods.

The generation loop takes the next input window (speech, pushed audio or mic idle), or makes an idle
window just in time when nothing arrives, runs `generator.step` on the shared worker (which may make
it together with other sessions' blocks, `GpuWorker.run_block`) and puts the frames with their audio
on the media clock. Speech and pushed blocks are urgent on the shared worker,
idle blocks are not (speech first). A failing block (CUDA out of memory, any exception) ends this
session only, with an `out_of_memory` or `generation_failed` error; the worker and the other sessions
carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from liveavatar.generator import AvatarSpec, Generator, Size
from liveavatar.media_io import PcmResampler
from server import protocol as P
from server.feed import AudioFeed, Utterance, WindowItem
from server.media import Block, MediaClock, Upsampler
from server.metrics import Metrics, SessionSnapshot
from server.protocol import ProtocolError
from server.segmenter import Segmenter, VadEvent
from server.tasks import OwnedTasks, bounded
from server.worker import GpuWorker

log = logging.getLogger(__name__)
Events = Callable[[P.ServerMessage], None]
Failed = Callable[[str, str, str], None]
"""(error code, message for the client, close reason): the stream cannot go on; its owner ends it."""

CATCH_UP_MARGIN_BLOCKS = 0.25
"""Blocks above the minimum lag that a block of live silence may still show at (`catch_up_lag`): 120 ms
of room for the block-to-block jitter of generation, so steady speech-free streaming trims nothing."""

FREE_TIMEOUT_S = 10.0
"""How long `close()` waits for the generator to free the session's state: that call waits its turn on
the GPU set's worker behind other sessions' blocks, and the reservation is released only after it."""


class Playout:
    """What the transport reports it sent (counts only; media flows the other way), for stats and metrics."""

    def __init__(self, sid: str, metrics: Metrics) -> None:
        self.sid, self.metrics = sid, metrics
        self.dropped = 0
        """Video frames the transport skipped because its encoder fell behind."""
        self._sent: deque[float] = deque(maxlen=100)

    def frame_sent(self, _slot: int) -> None:
        self.metrics.frames_sent += 1
        self._sent.append(time.monotonic())

    def frames_skipped(self, count: int) -> None:
        self.dropped += count
        self.metrics.frames_dropped += count
        log.warning("session %s: video encoder behind, skipped %d frames", self.sid, count)

    def audio_sent(self, _frame: int) -> None:
        self.metrics.audio_frames_sent += 1

    def fps(self, window_s: float = 2.0) -> float:
        """Frames sent per second over the last `window_s`."""
        now = time.monotonic()
        recent = [t for t in self._sent if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)


class AvatarStream:
    """Audio in, synchronised frames out on `clock`, events back through `events`; owns its tasks."""

    def __init__(
        self,
        sid: str,
        mode: str,
        generator: Generator,
        worker: GpuWorker,
        metrics: Metrics,
        events: Events,
        spec: AvatarSpec,
        size: Size,
        on_failed: Failed,
        vad_mode: int = 2,
        max_push_seconds: float = 120.0,
        max_lag_blocks: float = 2.0,
        steps_now: Callable[[], int] | None = None,
        realtime: P.RealtimePlanFields | None = None,
    ) -> None:
        """`mode`: "mic" (live audio with arrival times, held to the lag bound) or "push";
        `max_lag_blocks`: the lag bound beyond the minimum (docs/architecture.md); `steps_now()`: the
        server's current denoising step count, applied where the generator can degrade."""
        self.id, self.mode = sid, mode
        self.generator, self.worker, self.metrics, self.events = generator, worker, metrics, events
        self.spec, self.size = spec, size
        self.on_failed = on_failed
        self.rate = generator.sample_rate
        self.samples_per_frame = generator.audio_samples_per_block // generator.frames_per_block
        blank = np.zeros((size.height, size.width, 3), np.uint8)
        self.clock = MediaClock(
            generator.fps, blank, on_block_start=self._block_started, on_block_end=self._block_ended
        )
        segmenter = Segmenter(self.rate, generator.audio_samples_per_block, vad_mode=vad_mode)
        self.feed = AudioFeed(
            segmenter,
            self._on_vad,
            max_push_seconds=max_push_seconds,
            max_pending_windows=max(2, math.ceil(max_lag_blocks) + 1),
        )
        self.playout = Playout(sid, metrics)
        self.tasks = OwnedTasks(sid, self._task_failed)
        self.closing = False
        """Set by the owner when the session starts closing: input is ignored, failures not reported."""
        self.blocks = 0
        self._state: Any = None
        self._pending_spec: AvatarSpec | None = None
        self._upsampler = Upsampler(48_000 // self.rate)
        self._push_resamplers: dict[int, PcmResampler] = {}
        self._input_lock = asyncio.Lock()
        """Keeps pushes, push_end and interrupt in order; held while a push runs in a worker thread,
        during which nothing else touches the feed's segmenter."""
        self._step_s = 0.1  # running estimate of one generator step, for just-in-time idle blocks
        self._in_flight = 0  # blocks submitted and not back yet (pipelined sets)
        self._step_peak = 0.1  # slowly decaying worst step, for the live lag target
        self.block_s = generator.frames_per_block / generator.fps
        self._lags: deque[tuple[float, float | None]] = deque(maxlen=25)
        """(lag, the bound its block was made with) of the last blocks that played."""
        self._onset_lag: float | None = None
        self._onsets: deque[tuple[int, float]] = deque(maxlen=16)
        self.max_lag_blocks = max_lag_blocks
        self.steps_now = steps_now
        self.realtime = realtime
        """Whether one session keeps real time on this server (`RealtimePlan`), sent in `stats`."""
        self.sample_steps = 0
        """Denoising steps of the last block (0: the backend has no such knob)."""

    # ---- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """The generator's session state, and its poster on the clock until the first block."""
        self._state, poster = await self.worker.run(self.id, self._open_state)
        if poster is not None:
            self.clock.show_until_first_block(poster)

    def start(self) -> None:
        """Start generating (and reporting stats); the clock's reader paces what is played."""
        self.tasks.spawn(self._generate(), "generate")
        self.tasks.spawn(self._report(), "stats")

    async def close(self) -> None:
        """Stop the tasks, empty the clock, free the generator state; bounded in time, never raises."""
        self.closing = True
        await self.tasks.stop()
        self.clock.close()
        self.worker.forget(self.id)
        if self._state is not None:
            state, self._state = self._state, None
            free = self.worker.run(self.id, self.generator.close, state)
            await bounded(self.id, free, "freeing the generator state", FREE_TIMEOUT_S)

    def _task_failed(self, _task: asyncio.Task[Any], exc: BaseException) -> None:
        """A task that died of an exception is a bug: the stream's state is unknown now, so it ends."""
        if not self.closing:
            message = f"the server failed and closed this session: {type(exc).__name__}: {exc}"
            self.on_failed("internal", message, "internal error")

    # ---- audio in -------------------------------------------------------------------------------

    def feed_mic(self, pcm: np.ndarray, arrival: float) -> None:
        """Live mic audio (s16 mono at the generator's rate) and its monotonic arrival time."""
        if not self.closing:
            self.feed.feed_mic(pcm, arrival)

    def mic_gap(self, seconds: float) -> None:
        """No mic audio arrived for `seconds` (muted, network gone): silence, not a pause."""
        if not self.closing:
            self.feed.mic_gap(seconds)

    async def push(self, pcm: np.ndarray, rate: int) -> None:
        """Pushed s16 mono PCM at `rate` (resampled to the generator's rate with state kept per rate).

        Resampling and the VAD of a large push take a while (~0.1 s for 8 MiB), so they run in a
        worker thread; the input lock keeps this stream's pushes, push_end and interrupt in order."""
        if self.mode != "push":
            raise ProtocolError("wrong_mode", "this session takes its audio from the microphone")
        if not len(pcm):  # nothing to say (and libswresample fails on a frame of no samples)
            return
        async with self._input_lock:
            if self.closing:
                return
            self.feed.check_push(len(pcm) if rate == self.rate else math.ceil(len(pcm) * self.rate / rate))
            now = time.monotonic()
            start, samples, produced = await asyncio.to_thread(self._push_work, pcm, rate)
            if self.closing:
                return
            self.feed.record_push(start, samples, now)
            self.feed.ingest(produced, now)

    def _push_work(self, pcm: np.ndarray, rate: int) -> tuple[int, int, list[Any]]:
        """Worker thread, under the input lock: resample and segment; returns (start, samples, output)."""
        if rate != self.rate:
            resampler = self._push_resamplers.setdefault(rate, PcmResampler(self.rate))
            pcm = resampler.resample(_audio_frame(pcm, rate))
        segmenter = self.feed.segmenter
        start = segmenter.position
        return start, len(pcm), segmenter.push(pcm)

    async def push_end(self) -> None:
        if self.mode != "push":
            raise ProtocolError("wrong_mode", "push_end needs a push-mode session")
        async with self._input_lock:
            if self.closing:
                return
            for resampler in self._push_resamplers.values():  # the resampler's delayed tail belongs to it
                tail = resampler.resample(None)
                if tail.size:
                    self.feed.push(tail)
            self._push_resamplers.clear()
            utt = self.feed.push_end()
            if utt is not None and utt.finished:
                self._finish(utt)

    async def interrupt(self) -> None:
        """Drop queued audio and blocks; the block on screen finishes, then the avatar idles."""
        async with self._input_lock:  # after the pushes before it, never in the middle of one
            if self.closing:
                return
            cut = self.feed.interrupt()
            self.clock.flush()
            self._push_resamplers.clear()
            playing = self.clock.playing
            on_screen = playing.meta.utterances if playing is not None else []
            for utt in cut:
                if utt not in on_screen:
                    self._finish(utt)
            log.info("session %s interrupted (%d utterances cut)", self.id, len(cut))

    def switch(self, spec: AvatarSpec) -> None:
        """Another avatar from the next block on (`switched` says which block)."""
        self._pending_spec = spec

    def _on_vad(self, event: VadEvent, arrival: float) -> None:
        if event.kind == "speech_start" and self.mode == "mic":
            self._onsets.append((event.sample, arrival))
        at = round(event.sample / self.rate, 3)
        where = self.feed.locate(event.sample)
        if where is None:
            self.events(P.speech(event.kind, at))
        else:
            self.events(P.speech(event.kind, at, where[0].id, round(where[1] / self.rate, 3)))

    # ---- generation -----------------------------------------------------------------------------

    async def _generate(self) -> None:
        try:
            if self.generator.pipeline_depth > 1:
                await self._generate_pipelined()
                return
            while True:
                item = await self._next_window()
                if item.epoch != self.feed.epoch:
                    continue
                await self._apply_switch()
                self._apply_steps()
                started = time.perf_counter()
                frames = await self.worker.run_block(
                    self.id, self.generator, self._state, item.window, urgent=not item.preemptible
                )
                await self._deliver(item, frames, time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._generation_failed(exc)

    async def _generate_pipelined(self) -> None:
        """Up to `pipeline_depth` + 1 blocks in flight: windows go into the pipeline as they come (idle
        ones just in time) and a second task puts the frames on the clock in order as they come back.
        The one extra waits at the first rank, so that rank starts the next block as soon as it is free
        rather than when an earlier block's frames have come back through this process: with only
        `pipeline_depth`, every hand-back delay idled it, and a set at 452 ms per block fell behind
        480 ms of audio (2 GPUs, 704×384: docs/benchmarks.md)."""
        slots = asyncio.Semaphore(self.generator.pipeline_depth + 1)
        flight: asyncio.Queue[tuple[WindowItem, asyncio.Future[Any], float]] = asyncio.Queue()
        self.tasks.spawn(self._collect(flight, slots), "collect")
        while True:
            await slots.acquire()
            item = await self._next_window()
            if item.epoch != self.feed.epoch:
                slots.release()
                continue
            await self._apply_switch()
            future = asyncio.wrap_future(self.generator.submit(self._state, item.window))
            self._in_flight += 1
            flight.put_nowait((item, future, time.perf_counter()))

    async def _collect(
        self, flight: asyncio.Queue[tuple[WindowItem, asyncio.Future[Any], float]], slots: asyncio.Semaphore
    ) -> None:
        try:
            while True:
                item, future, started = await flight.get()
                try:
                    result = await future
                finally:
                    self._in_flight -= 1
                self.worker.load.record(result.busy_s)  # the set's block interval, for admission
                await self._deliver(item, result.frames, time.perf_counter() - started)
                slots.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._generation_failed(exc)

    async def _apply_switch(self) -> None:
        if self._pending_spec is not None:
            spec, self._pending_spec = self._pending_spec, None
            await self.worker.run(self.id, self.generator.switch, self._state, spec)
            self.spec = spec
            self.events(P.switched(self.blocks))

    async def _deliver(self, item: WindowItem, frames: np.ndarray, took: float) -> None:
        """One generated block onto the media clock; `took`: seconds from its start to its frames."""
        self._step_s = 0.8 * self._step_s + 0.2 * took
        self._step_peak = max(took, 0.95 * self._step_peak)
        self.metrics.blocks_generated += 1
        self.metrics.step_seconds_sum += took
        self.blocks += 1
        self._check_frames(frames)
        audio = self._upsampler(item.window.samples)
        bound = self.max_lag()
        # Speech keeps the whole bound; a block of mic silence is cut to the catch-up target where media
        # waits behind it, so a lag that grew (a slow first block, a burst of load) shrinks back during
        # the next pause.
        catch_up = self._deadlines(item, self.catch_up_lag()) if item.preemptible else None
        block = Block(
            frames, audio, item.preemptible, item, deadlines=self._deadlines(item, bound), catch_up=catch_up,
            bound=bound,
        )  # fmt: skip
        await self.clock.put(block, valid=lambda e=item.epoch: e == self.feed.epoch)

    def _generation_failed(self, exc: Exception) -> None:
        code, message = describe_failure(exc)
        log.error("session %s: %s", self.id, message, exc_info=code != "out_of_memory")
        self.on_failed(code, message, code.replace("_", " "))

    def _apply_steps(self) -> None:
        """Follow the server's step count (degrade under load) where the backend supports it."""
        if not self.generator.step_control:
            return
        wanted = self.steps_now() if self.steps_now is not None else None
        if wanted != self.sample_steps:
            self.sample_steps = self.generator.set_sample_steps(self._state, wanted)

    async def _next_window(self) -> WindowItem:
        """The next queued window, else an idle one made just before the clock would run dry."""
        while True:
            item = self.feed.pop()
            if item is not None:
                return item
            # blocks in flight (a pipelined set) come onto the clock before a new one could
            ahead = self.clock.buffered_seconds() + self._in_flight * self.block_s
            slack = ahead - (1.5 * self._step_s + 0.06)
            # Not while a push runs in its worker thread: it owns the segmenter, and its windows come next.
            if slack <= 0 and not self.feed.mic_live(time.monotonic()) and not self._input_lock.locked():
                return self.feed.idle()
            await self.feed.wait(slack if slack > 0 else 0.04)

    def min_lag(self) -> float:
        """The least lag live audio can have: a whole block heard, a (slow) step, one frame slot."""
        return self.block_s + self._step_peak + self.clock.slot_seconds

    def catch_up_lag(self) -> float:
        """The lag a block of live silence is trimmed to while media is queued behind it (`Block.catch_up`):
        the minimum plus a quarter block of margin for jitter. What a lag above the minimum costs is the
        onset of the next utterance, so it is given back while nobody speaks, as a WebRTC jitter buffer
        shortens silence (NetEQ's "accelerate")."""
        return min(self.min_lag() + CATCH_UP_MARGIN_BLOCKS * self.block_s, self.max_lag())

    def max_lag(self) -> float:
        """The lag bound for blocks made now: frames that would show later are skipped (docs/architecture.md)."""
        return self.min_lag() + self.max_lag_blocks * self.block_s

    def lag_bound(self) -> float:
        """The bound that goes with the last reported lag (the one its block was made with), so the two
        always compare; the bound for new blocks before any lag was measured."""
        if self._lags and self._lags[-1][1] is not None:
            return self._lags[-1][1]
        return self.max_lag()

    def _deadlines(self, item: WindowItem, bound: float) -> list[float] | None:
        """Live mic audio must be on screen within the lag bound of its arrival: per frame, the arrival
        of the frame's first sample (as the lag figure counts it) plus the bound."""
        if self.mode != "mic" or item.arrival is None:
            return None
        return [self._arrival_of(item, f) + bound for f in range(self.generator.frames_per_block)]

    def _arrival_of(self, item: WindowItem, frame: int) -> float:
        """When the audio shown with `frame` of the window's block arrived (the window's arrival when
        the feed no longer remembers)."""
        assert item.arrival is not None  # asked only for windows of mic audio, which carry their arrival
        return self.feed.arrival(item.start + frame * self.samples_per_frame) or item.arrival

    def _open_state(self) -> tuple[Any, np.ndarray | None]:
        """Worker thread: the generator's session state and the poster shown until the first block."""
        state = self.generator.open(self.spec, self.size)
        try:  # cosmetic: a backend whose poster fails still streams, starting on black
            poster = self.generator.poster(state)
            if poster is not None:
                self._check_frames(poster, still=True)
        except Exception as exc:  # no exc_info: a kept traceback would keep `state` (GPU memory) alive
            log.warning("session %s: no poster from the %s backend: %r", self.id, self.generator.name, exc)
            poster = None
        return state, poster

    def _check_frames(self, frames: np.ndarray, still: bool = False) -> None:
        """A block's frames [n, H, W, 3] uint8 (or one still [H, W, 3]) exactly as the stream needs them."""
        expected: tuple[int, ...] = (self.size.height, self.size.width, 3)
        if not still:
            expected = (self.generator.frames_per_block, *expected)
        if not isinstance(frames, np.ndarray) or frames.shape != expected or frames.dtype != np.uint8:
            got = getattr(frames, "shape", type(frames))
            raise RuntimeError(f"generator returned {got}, expected uint8 {expected}")

    # ---- playback events (event loop, from the clock as its reader takes slots) --------------------

    def _block_started(self, block: Block, due: float, first: int) -> None:
        item: WindowItem = block.meta
        shown = item.start + first * self.samples_per_frame  # the first sample that plays
        if item.arrival is not None:
            self._lags.append((due - self._arrival_of(item, first), block.bound))
        stop = item.start + len(block.frames) * self.samples_per_frame
        while self._onsets and self._onsets[0][0] < stop:
            sample, arrival = self._onsets.popleft()
            if sample >= item.start:
                self._onset_lag = due + max(0, sample - shown) / self.rate - arrival
        for utt in item.utterances:
            if not utt.started:
                utt.started = True
                self.events(P.started(self.id, utt.id))

    def _block_ended(self, block: Block, _due: float, end: int) -> None:
        item: WindowItem = block.meta
        first = item.start + block.first * self.samples_per_frame
        stop = item.start + end * self.samples_per_frame
        for utt in item.utterances:
            utt.played += utt.overlap(first, stop)
            if utt.ended and not utt.finished and (utt.interrupted or stop >= utt.end):
                self._finish(utt)

    def _finish(self, utt: Utterance) -> None:
        utt.finished = True
        with contextlib.suppress(ValueError):
            self.feed.utterances.remove(utt)
        self.events(P.finished(self.id, utt.id, round(utt.played / self.rate, 3), utt.interrupted))

    # ---- reporting ------------------------------------------------------------------------------

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(
            fps=self.playout.fps(),
            lag_s=self._lags[-1][0] if self._lags else None,
            onset_lag_s=self._onset_lag,
            queue_depth=self.clock.queued_blocks + self.feed.pending,
            blocks=self.blocks,
            dropped_frames=self.playout.dropped,
        )

    async def _report(self) -> None:
        """A stats message every second, for the page's stats line."""
        while True:
            await asyncio.sleep(1.0)
            snap = self.snapshot()
            self.events(
                P.stats(
                    fps=round(snap.fps, 2),
                    lag_ms=None if snap.lag_s is None else round(snap.lag_s * 1000),
                    onset_lag_ms=None if snap.onset_lag_s is None else round(snap.onset_lag_s * 1000),
                    queue_depth=snap.queue_depth,
                    blocks=snap.blocks,
                    dropped_frames=snap.dropped_frames,
                    underrun_frames=self.clock.filler_slots,
                    trimmed_frames=self.clock.trimmed_frames,
                    dropped_windows=self.feed.dropped_windows,
                    dropped_late_blocks=self.clock.dropped_late_blocks,
                    backend=self.generator.name,
                    sample_steps=self.sample_steps,
                    max_lag_ms=round(self.lag_bound() * 1000),
                    realtime=self.realtime,
                )
            )

    def holding_nbytes(self) -> int:
        """Bytes the generator state holds now (0 when the backend cannot tell, or while the session is
        still opening: its admission reservation stands for it until then), for admission."""
        if self._state is None:
            return 0
        try:
            return int(self.generator.state_nbytes(self._state))
        except RuntimeError:  # a worker thread changed the state meanwhile: ask again next time
            return 0


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """An exception from the generator -> (error code, message for the client and the log)."""
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "out_of_memory", f"the GPU ran out of memory for this session and it was closed: {exc}"
    return "generation_failed", f"generation failed and the session was closed: {type(exc).__name__}: {exc}"


def _audio_frame(pcm: np.ndarray, rate: int) -> Any:
    from av import AudioFrame

    frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    return frame
