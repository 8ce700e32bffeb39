"""The segmenter's voice activity detector is swappable: another one drives its events and windows."""

from __future__ import annotations

import numpy as np
import pytest

from liveavatar.generator import AudioWindow
from liveavatar.media_io import decode_audio, float_to_int16
from server.segmenter import Segmenter, VadEvent
from server.vad import VoiceActivityDetector, WebRtcVad

RATE = 16_000
BLOCK = 7_680


class EnergyVad:
    """Speech is anything louder than `threshold_dbfs`: a detector webrtcvad would not agree with."""

    sample_rates = (16_000,)
    frame_ms = (20,)

    def __init__(self, threshold_dbfs: float = -30.0) -> None:
        self.threshold = 32768.0 * 10 ** (threshold_dbfs / 20)
        self.frames: list[tuple[int, int]] = []

    def is_speech(self, frame: bytes, sample_rate: int) -> bool:
        self.frames.append((len(frame), sample_rate))
        pcm = np.frombuffer(frame, "<i2").astype(np.float64)
        return float(np.sqrt(np.mean(pcm**2))) > self.threshold


class NeverSpeech:
    sample_rates = (8_000, 16_000)
    frame_ms = (10, 20, 30)

    def is_speech(self, frame: bytes, sample_rate: int) -> bool:
        return False


def hum_then_tone() -> np.ndarray:
    """4 s of hum at -45 dBFS (above the segmenter's -55 dBFS floor) with a -12 dBFS tone from 1 s to 2 s."""
    t = np.arange(4 * RATE) / RATE
    pcm = 32768 * 10 ** (-45 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 50 * t)
    tone = slice(RATE, 2 * RATE)
    pcm[tone] += 32768 * 10 ** (-12 / 20) * np.sin(2 * np.pi * 220 * t[tone])
    return pcm.astype(np.int16)


def split(items) -> tuple[list[VadEvent], list[AudioWindow]]:
    return [i for i in items if isinstance(i, VadEvent)], [i for i in items if isinstance(i, AudioWindow)]


def test_webrtcvad_is_a_voice_activity_detector() -> None:
    vad: VoiceActivityDetector = WebRtcVad(2)
    assert RATE in vad.sample_rates and 20 in vad.frame_ms
    assert vad.is_speech(bytes(640), RATE) is False


def test_a_custom_detector_decides_the_events_and_the_speech_windows() -> None:
    vad = EnergyVad()
    seg = Segmenter(RATE, BLOCK, vad=vad, start_ms=100, hangover_ms=200)
    events, windows = split([*seg.push(hum_then_tone()), *seg.flush()])
    # the onset is dated back to the first loud frame, the end to just after the last one
    assert [(e.kind, e.sample) for e in events] == [("speech_start", RATE), ("speech_end", 2 * RATE)]
    speech = [w.index for w in windows if w.speech]
    assert speech == [RATE // BLOCK, RATE // BLOCK + 1, 2 * RATE // BLOCK], speech
    assert set(vad.frames) == {(2 * RATE * 20 // 1000, RATE)}  # 20 ms of 16-bit samples per call
    assert len(vad.frames) == 4 * RATE // 320  # every hum frame is above the floor; flush's zero padding is not


def test_a_detector_that_hears_nothing_silences_real_speech(assets) -> None:
    pcm = float_to_int16(decode_audio(assets / "speech_en_16k.wav").samples)
    assert split(Segmenter(vad=WebRtcVad(2)).push(pcm))[0], "the default detector hears this speech"
    events, windows = split(Segmenter(vad=NeverSpeech()).push(pcm))
    assert not events and windows and not any(w.speech for w in windows)


def test_a_stream_the_detector_cannot_judge_is_refused() -> None:
    with pytest.raises(ValueError, match="EnergyVad judges 16000 Hz audio, not 8000"):
        Segmenter(8_000, 3_840, vad=EnergyVad())
    with pytest.raises(ValueError, match="frames of 20 ms, not 10"):
        Segmenter(RATE, BLOCK, frame_ms=10, vad=EnergyVad())
