"""A second transport, for the tests: an avatar stream's frames and audio go straight to the test, no
WebRTC. It is a class of its own, not an edit of the WebRTC one (server/webrtc.py): it drives the same
`AvatarStream` boundary (docs/architecture.md, "Avatar stream and transport").

It reads the stream's media clock slot by slot at the clock's pace, as the WebRTC tracks do, and keeps
what it read by slot index, so a test checks sync and events in media time (slot n is n / fps seconds
into the stream), not by when things arrived.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from liveavatar.generator import AvatarSpec, Generator, Size
from server import protocol as P
from server.avatar import AvatarStream
from server.metrics import Metrics
from server.worker import GpuWorker


@dataclass
class Received:
    images: list[np.ndarray] = field(default_factory=list)
    """Slot n's image at index n."""
    audio: list[np.ndarray] = field(default_factory=list)
    """Slot n's audio (int16, 48 kHz, one slot long) at index n."""
    events: list[tuple[int, P.ServerMessage]] = field(default_factory=list)
    """(the slot being read when it came, the event)."""
    failures: list[tuple[str, str]] = field(default_factory=list)

    def of(self, kind: str) -> list[tuple[int, Any]]:
        return [(slot, m) for slot, m in self.events if m["type"] == kind]


class InProcessTransport:
    """Opens an `AvatarStream`, plays its clock into `received`, takes audio from the test."""

    def __init__(self, generator: Generator, mode: str, spec: AvatarSpec, size: Size, **stream_options: Any) -> None:
        self.received = Received()
        self.worker = GpuWorker(threads=1, name="in-process")
        self.stream = AvatarStream(
            "in-process",
            mode,
            generator,
            self.worker,
            Metrics(),
            self._event,
            spec,
            size,
            self._failed,
            **stream_options,
        )
        self._reader: asyncio.Task[None] | None = None

    @property
    def slot(self) -> int:
        """The next slot this transport reads: where "now" is in media time."""
        return len(self.received.images)

    async def start(self) -> None:
        await self.stream.open()
        self.stream.start()
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        self.stream.closing = True
        if self._reader is not None:
            self._reader.cancel()
        await self.stream.close()
        self.worker.close()

    # ---- audio in: what a transport hands the stream ----------------------------------------------

    def feed_mic(self, pcm: np.ndarray) -> None:
        """Mic PCM at the generator's rate, arriving now."""
        self.stream.feed_mic(pcm, time.monotonic())

    # ---- media and events out ---------------------------------------------------------------------

    async def _read(self) -> None:
        clock, playout = self.stream.clock, self.stream.playout
        n = 0
        while True:
            await clock.sleep_until(clock.due(n))
            slot = clock.slot(n)
            assert slot is not None
            self.received.images.append(slot.image)
            self.received.audio.append(slot.audio)
            playout.frame_sent(n)
            playout.audio_sent(n)
            n += 1

    def _event(self, message: P.ServerMessage) -> None:
        self.received.events.append((self.slot, message))

    def _failed(self, code: str, message: str, _reason: str) -> None:
        self.received.failures.append((code, message))

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        for _ in range(int(timeout / 0.02)):
            if predicate():
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"condition not met in {timeout} s (at slot {self.slot})")
