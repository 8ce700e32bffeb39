"""A mic that stops sending mid-speech: the missing audio counts as silence, so the utterance ends."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from server_peer import ArrayAudioTrack, PeerClient

from liveavatar.media_io import decode_audio
from server.feed import AudioFeed
from server.segmenter import Segmenter


def speech(assets, seconds: float, rate: int) -> np.ndarray:
    audio = decode_audio(assets / "speech_en_48k.wav", rate=rate).samples[: int(seconds * rate)]
    return (audio * 32767).astype(np.int16)


class StallingMic(ArrayAudioTrack):
    """Sends its samples in real time, then nothing at all (no RTP), like a sender whose network died."""

    async def recv(self):
        if self._k * self.frame >= len(self.samples):
            self.stalled_at = getattr(self, "stalled_at", time.monotonic())
            await asyncio.Future()  # never returns: the sender has nothing more to send
        return await super().recv()


def test_a_mic_gap_during_speech_ends_the_utterance_and_feeds_nothing_otherwise(assets) -> None:
    events: list[str] = []
    feed = AudioFeed(Segmenter(), lambda e, _t: events.append(e.kind))
    feed.feed_mic(speech(assets, 2.0, 16_000))
    assert events == ["speech_start"]
    position = feed.segmenter.position
    feed.mic_gap(0.5)
    assert events == ["speech_start", "speech_end"]
    assert feed.segmenter.position == position + 8_000
    feed.mic_gap(0.5)  # not in speech any more: idle windows take over, nothing is fed
    assert feed.segmenter.position == position + 8_000


def test_a_mic_gap_reports_the_speech_end_of_an_utterance_an_idle_window_closed(assets) -> None:
    events: list[str] = []
    feed = AudioFeed(Segmenter(), lambda e, _t: events.append(e.kind))
    feed.feed_mic(speech(assets, 2.0, 16_000))
    feed.idle()  # the generation loop, when the mic has been quiet a moment
    assert events == ["speech_start"]
    feed.mic_gap(0.5)
    assert events == ["speech_start", "speech_end"]


async def test_speech_end_follows_when_the_mics_rtp_stops_mid_speech(start_server, assets) -> None:
    app = await start_server()
    client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
    mic = StallingMic(speech(assets, 3.0, 48_000))
    try:
        await client.start(mode="mic", mic=mic)
        start = await client.wait_for("speech_start", timeout=15)
        end = await client.wait_for("speech_end", timeout=5)
        waited = time.monotonic() - mic.stalled_at
    finally:
        await client.close()
    print(f"speech_end {waited:.2f} s after the mic's RTP stopped")
    assert end["at"] > start["at"]
    assert waited < 1.5  # the 0.5 s gap, then the VAD's 0.5 s hangover at most
