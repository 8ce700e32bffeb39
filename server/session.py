"""One viewer's session: peer connection, tracks, input feed, generator state; it owns its cleanup.

The generation loop takes the next input window (speech, pushed audio or mic idle), or makes an idle
window just in time when nothing arrives, runs `generator.step` on the shared worker and puts the
frames with their audio on the session's media clock. Sessions live in a `SessionRegistry` owned by
the app; whatever ends a session (stop, WebSocket closed, ICE failed/closed, no connection in time,
an error) goes through `close()`, which releases everything exactly once.

Speech and pushed blocks are urgent on the shared worker, idle blocks are not (speech first). A
failing block (CUDA out of memory, any exception) ends this session only, with an `out_of_memory` or
`generation_failed` error to its client; the worker and the other sessions carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from liveavatar.generator import AvatarSpec, Generator, Size
from liveavatar.media_io import PcmResampler
from server import protocol as P
from server.feed import AudioFeed, Utterance, WindowItem
from server.ice import RemoteCandidates
from server.media import Block, ClockAudioTrack, ClockVideoTrack, MediaClock, Upsampler
from server.metrics import Metrics, SessionSnapshot
from server.protocol import ProtocolError
from server.rtc import apply_offer, close_peer, parse_candidate
from server.segmenter import Segmenter, VadEvent
from server.worker import GpuWorker

log = logging.getLogger(__name__)
Post = Callable[[dict[str, Any]], None]

CLOSE_TIMEOUT_S = 1.5
"""How long `close()` waits for the session's tasks to stop and for its peer connection to close;
past that it logs what hung and releases the rest anyway, so a session always ends."""
FREE_TIMEOUT_S = 10.0
"""How long `close()` waits for the generator to free the session's state: that call waits its turn on
the GPU set's worker behind other sessions' blocks, and the reservation is released only after it."""


class Session:
    """Everything one peer uses; created by the app, registered in the registry, closed once."""

    def __init__(
        self,
        sid: str,
        mode: str,
        generator: Generator,
        worker: GpuWorker,
        metrics: Metrics,
        post: Post,
        spec: AvatarSpec,
        size: Size,
        vad_mode: int = 2,
        max_push_seconds: float = 120.0,
        connect_timeout_s: float = 30.0,
        on_closed: Callable[[Session], None] | None = None,
        max_lag_blocks: float = 2.0,
        steps_now: Callable[[], int] | None = None,
        realtime: dict[str, Any] | None = None,
        mic_gap_s: float = 0.5,
        client: str = "",
    ) -> None:
        """`max_lag_blocks`: the lag bound beyond the minimum (docs/architecture.md); `steps_now()`:
        the server's current denoising step count, applied where the generator can degrade;
        `mic_gap_s`: no mic audio for this long counts as silence."""
        self.id, self.mode = sid, mode
        self.token = secrets.token_urlsafe(18)
        """Capability token: what another connection must show to drive this session (docs/protocol.md)."""
        self.generator, self.worker, self.metrics, self.post = generator, worker, metrics, post
        self.spec, self.size = spec, size
        self.on_closed = on_closed
        self.client = client
        """Remote address of the connection that opened it (per-client limits)."""
        self.connect_timeout_s = connect_timeout_s
        self._peer_connected = False
        self.mic_gap_s = mic_gap_s
        self.rate = generator.sample_rate
        self.samples_per_frame = generator.audio_samples_per_block // generator.frames_per_block
        blank = np.zeros((size.height, size.width, 3), np.uint8)
        self.clock = MediaClock(generator.fps, blank, on_block_start=self._block_started, on_block_end=self._block_ended)
        segmenter = Segmenter(self.rate, generator.audio_samples_per_block, vad_mode=vad_mode)
        self.feed = AudioFeed(
            segmenter, self._on_vad, max_push_seconds=max_push_seconds,
            max_pending_windows=max(2, math.ceil(max_lag_blocks) + 1),
        )
        self.video = ClockVideoTrack(self.clock, on_frame=self._frame_sent, on_drop=self._frames_dropped)
        self.audio = ClockAudioTrack(self.clock, on_frame=self._audio_sent)
        self.pc: RTCPeerConnection | None = None
        self.candidates: RemoteCandidates | None = None
        self.video_codec = ""
        self.blocks = 0
        self.closed = asyncio.Event()
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self.close_timeout_s = CLOSE_TIMEOUT_S
        self._state: Any = None
        self._pending_spec: AvatarSpec | None = None
        self._upsampler = Upsampler(48_000 // self.rate)
        self._push_resamplers: dict[int, PcmResampler] = {}
        self._input_lock = asyncio.Lock()
        """Keeps pushes, push_end and interrupt in order; held while a push runs in a worker thread,
        during which nothing else touches the feed's segmenter."""
        self._followers: dict[object, Post] = {}
        """Other connections that push into this session: they get its `started` / `finished` too."""
        self.mic_track: MediaStreamTrack | None = None
        self.unused_tracks = 0
        """Remote tracks the session does not read (stopped at once)."""
        self._tasks: set[asyncio.Task[Any]] = set()
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

    async def start(self, offer_sdp: str, rtc_config: Any, video_codec: str = "auto") -> str:
        """Open the generator state, answer the offer (ICE gathered in the answer), start the loops."""
        self._state, poster = await self.worker.run(self.id, self._open_state)
        if poster is not None:
            self.clock.show_until_first_block(poster)
        self.pc = pc = RTCPeerConnection(rtc_config)
        pc.on("connectionstatechange", self._connection_changed)
        pc.on("track", self._remote_track)
        self.candidates = RemoteCandidates(pc, self.id)
        answer, self.video_codec = await apply_offer(
            pc, offer_sdp, self.mode, self.video, self.audio, video_codec, self.candidates
        )
        self._spawn(self._generate(), "generate")
        self._spawn(self._report(), "stats")
        self._spawn(self._connect_watchdog(), "watchdog")
        log.info("session %s opened (%s mode, %s, %s)", self.id, self.mode, self.video_codec, self.size)
        return answer

    async def add_ice(self, candidate: str | None, sdp_mid: str | None, mline: int | None) -> None:
        """A trickled candidate; resolving it (mDNS) never holds this connection's messages up."""
        if self.candidates is None:
            raise ProtocolError("unknown_session", "send an offer before ICE candidates")
        parsed = parse_candidate(candidate, sdp_mid, mline)
        if not self._closing:
            self.candidates.add(parsed)

    async def close(self, reason: str) -> None:
        """Release everything this session holds; safe to call from anywhere, any number of times.

        Returns within a bounded time (see CLOSE_TIMEOUT_S). The work runs in a task of its own, so a
        caller that is cancelled meanwhile (even one of the session's own tasks) cannot leave the
        session half closed."""
        await asyncio.shield(self.begin_close(reason))

    def begin_close(self, reason: str) -> asyncio.Task[None]:
        """Start closing (once; later reasons are ignored) without waiting; returns the closing task."""
        if self._closer is None:
            self._closing = True
            self._closer = asyncio.create_task(self._close(reason), name=f"close-{self.id}")
            self._closer.add_done_callback(_log_close_failure)
        return self._closer

    async def _close(self, reason: str) -> None:
        log.info("session %s closing: %s", self.id, reason)
        try:
            await self._stop_tasks()
            if self.candidates is not None:
                await self._bounded(self.candidates.close(), "stopping remote candidate lookups", self.close_timeout_s)
            self.clock.close()
            self.video.stop()
            self.audio.stop()
            if self.pc is not None:
                pc, self.pc = self.pc, None
                await self._bounded(close_peer(pc), "closing the peer connection", self.close_timeout_s)
                pc.remove_all_listeners()
            self.worker.forget(self.id)
            if self._state is not None:
                state, self._state = self._state, None
                free = self.worker.run(self.id, self.generator.close, state)
                await self._bounded(free, "freeing the generator state", FREE_TIMEOUT_S)
        finally:  # whatever failed or hung above, the session is over for its client and the server
            self._followers.clear()
            self.closed.set()
            self.post(P.closed(self.id, reason))
            if self.on_closed:
                self.on_closed(self)

    async def _stop_tasks(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if not tasks:
            return
        _, running = await asyncio.wait(tasks, timeout=self.close_timeout_s)
        if running:
            names = ", ".join(sorted(t.get_name() for t in running))
            log.error("session %s: tasks still running %.1f s after cancel (%s); closing anyway", self.id,
                      self.close_timeout_s, names)

    async def _bounded(self, step: Any, what: str, timeout_s: float) -> None:
        """Await one release step, at most `timeout_s`; a failure or a hang is logged, not raised."""
        try:
            async with asyncio.timeout(timeout_s):
                await step
        except TimeoutError:
            log.error("session %s: %s took over %.1f s; closing anyway", self.id, what, timeout_s)
        except Exception:
            log.exception("session %s: %s failed; closing anyway", self.id, what)

    def _spawn(self, coro: Any, name: str) -> None:
        """Start one of the session's tasks; close() cancels it, and its failure closes the session."""
        task = asyncio.create_task(coro, name=f"{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A task that died of an exception is a bug: say so to the client and the log, and end the
        session (its state is unknown now) instead of leaving an unretrieved exception behind."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("session %s: task %s failed", self.id, task.get_name(), exc_info=exc)
        if self._closing:
            return
        self.metrics.error("internal")
        self.post(P.error("internal", f"the server failed and closed this session: {type(exc).__name__}: {exc}"))
        self.begin_close("internal error")

    def _connection_changed(self) -> None:
        state = self.pc.connectionState if self.pc else "closed"
        log.info("session %s peer connection %s", self.id, state)
        if state == "connected":
            self._peer_connected = True
        if state in ("failed", "closed"):
            self.begin_close(f"peer connection {state}")

    @property
    def waiting_for_peer(self) -> bool:
        """Open, and its peer connection has never come up (yet)."""
        return not self._peer_connected and not self._closing

    async def _connect_watchdog(self) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if self.pc is not None and self.pc.connectionState != "connected":
            self.begin_close(f"no peer connection after {self.connect_timeout_s:.0f} s")

    # ---- input ----------------------------------------------------------------------------------

    def _remote_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.mode == "mic" and self.mic_track is None:
            self.mic_track = track
            self._spawn(self._read_mic(track), "mic")
            return
        # A track nobody reads (the camera a browser sends, audio in push mode): our transceivers for
        # it are sendonly, so its receiver never starts decoding; stop it so that stays explicit.
        # (check_offer refuses a second audio or video m-line, whose receiver would decode for nothing.)
        self.unused_tracks += 1
        log.info("session %s: ignoring the client's %s track", self.id, track.kind)
        track.stop()

    async def _read_mic(self, track: MediaStreamTrack) -> None:
        resampler = PcmResampler(self.rate)
        while True:
            try:
                async with asyncio.timeout(self.mic_gap_s):
                    frame = await track.recv()
            except TimeoutError:  # the sender stopped (muted, network gone): that is silence, not a pause
                self.feed.mic_gap(self.mic_gap_s)
                continue
            except MediaStreamError:
                return
            pcm = resampler.resample(frame)  # type: ignore[arg-type]  # audio tracks give AudioFrames
            if pcm.size:
                self.feed.feed_mic(pcm)

    async def push_pcm(self, pcm: np.ndarray, rate: int) -> None:
        """Pushed s16 mono PCM at `rate` (resampled to the generator's rate with state kept per rate).

        Resampling and the VAD of a large push take a while (~0.1 s for 8 MiB), so they run in a
        worker thread; the input lock keeps this session's pushes, push_end and interrupt in order."""
        if self.mode != "push":
            raise ProtocolError("wrong_mode", "this session takes its audio from the microphone")
        if not len(pcm):  # nothing to say (and libswresample fails on a frame of no samples)
            return
        async with self._input_lock:
            if self._closing:
                return
            self.feed.check_push(len(pcm) if rate == self.rate else math.ceil(len(pcm) * self.rate / rate))
            now = time.monotonic()
            start, samples, produced = await asyncio.to_thread(self._push_work, pcm, rate)
            if self._closing:
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
            if self._closing:
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
            if self._closing:
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

    def follow(self, key: object, post: Post) -> None:
        """Send this session's playback events (`started`, `finished`) to `post` too, until unfollow."""
        self._followers[key] = post

    def unfollow(self, key: object) -> None:
        self._followers.pop(key, None)

    def _playback(self, message: dict[str, Any]) -> None:
        self.post(message)
        for post in list(self._followers.values()):
            post(message)

    def switch(self, spec: AvatarSpec) -> None:
        self._pending_spec = spec

    def _on_vad(self, event: VadEvent, arrival: float) -> None:
        if event.kind == "speech_start" and self.mode == "mic":
            self._onsets.append((event.sample, arrival))
        at = round(event.sample / self.rate, 3)
        where = self.feed.locate(event.sample)
        if where is None:
            self.post(P.speech(event.kind, at))
        else:
            self.post(P.speech(event.kind, at, where[0].id, round(where[1] / self.rate, 3)))

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
                frames = await self.worker.run(
                    self.id, self.generator.step, self._state, item.window,
                    urgent=not item.preemptible, measure=True,
                )
                await self._deliver(item, frames, time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._generation_failed(exc)

    async def _generate_pipelined(self) -> None:
        """Up to `pipeline_depth` blocks in flight: windows go into the pipeline as they come (idle ones
        just in time) and a second task puts the frames on the clock in order as they come back."""
        slots = asyncio.Semaphore(self.generator.pipeline_depth)
        flight: asyncio.Queue[tuple[WindowItem, asyncio.Future[Any], float]] = asyncio.Queue()
        self._spawn(self._collect(flight, slots), "collect")
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
            self.post(P.switched(self.blocks))

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
        block = Block(frames, audio, item.preemptible, item, deadlines=self._deadlines(item, bound), bound=bound)
        await self.clock.put(block, valid=lambda e=item.epoch: e == self.feed.epoch)

    def _generation_failed(self, exc: Exception) -> None:
        code, message = describe_failure(exc)
        log.error("session %s: %s", self.id, message, exc_info=code != "out_of_memory")
        self.metrics.error(code)
        self.post(P.error(code, message))
        self.begin_close(code.replace("_", " "))

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

    # ---- clock callbacks (event loop, from the tracks) --------------------------------------------

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
                self._playback(P.started(self.id, utt.id))

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
        self._playback(P.finished(self.id, utt.id, round(utt.played / self.rate, 3), utt.interrupted))

    def _frame_sent(self, _slot: int) -> None:
        self.metrics.frames_sent += 1

    def _frames_dropped(self, count: int) -> None:
        self.metrics.frames_dropped += count
        log.warning("session %s: video encoder behind, skipped %d frames", self.id, count)

    def _audio_sent(self, _frame: int) -> None:
        self.metrics.audio_frames_sent += 1

    # ---- reporting ------------------------------------------------------------------------------

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(
            fps=self.video.fps(),
            lag_s=self._lags[-1][0] if self._lags else None,
            onset_lag_s=self._onset_lag,
            queue_depth=self.clock.queued_blocks + self.feed.pending,
            blocks=self.blocks,
            dropped_frames=self.video.dropped,
        )

    async def _report(self) -> None:
        """A stats message every second, for the page's stats line."""
        while True:
            await asyncio.sleep(1.0)
            snap = self.snapshot()
            self.post(
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
        """Bytes the generator state holds now (0 when the backend cannot tell), for admission."""
        try:
            return int(self.generator.state_nbytes(self._state))
        except RuntimeError:  # a worker thread changed the state meanwhile: ask again next time
            return 0


def _log_close_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("closing a session failed", exc_info=task.exception())


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


class SessionRegistry:
    """The app's sessions by id, with the configured limit; the only place sessions are kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sessions: dict[str, Session] = {}

    def add(self, session: Session) -> None:
        if len(self._sessions) >= self.limit:
            raise ProtocolError("server_full", f"the server is full ({self.limit} sessions); try again later")
        self._sessions[session.id] = session

    def remove(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def get(self, sid: str) -> Session | None:
        return self._sessions.get(sid)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in self), return_exceptions=True)
