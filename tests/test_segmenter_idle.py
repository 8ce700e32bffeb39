"""Idle blocks, flushing and the input contract of the segmenter, on synthetic audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from liveavatar.generator import AudioWindow
from liveavatar.media_io import decode_audio, float_to_int16
from server.segmenter import Segmenter, VadEvent

ASSETS = Path(__file__).parent / "assets"
BLOCK = 7_680


@pytest.fixture(scope="module")
def speech_pcm() -> np.ndarray:
    return float_to_int16(decode_audio(ASSETS / "speech_en_16k.wav").samples)[: 16_000 * 3]


def test_idle_window_is_silent_and_continues_the_stream() -> None:
    seg = Segmenter(context_samples=BLOCK * 2)
    tone = (np.sin(np.arange(BLOCK) * 0.05) * 8_000).astype(np.int16)
    first = seg.push(tone)
    idle = seg.idle_window()
    again = seg.idle_window()
    assert [w.index for w in first if isinstance(w, AudioWindow)] == [0]
    assert (idle.index, again.index) == (1, 2)
    assert not idle.speech and not np.any(idle.samples) and len(idle.samples) == BLOCK
    np.testing.assert_allclose(idle.context, tone.astype(np.float32) / 32768.0)
    assert len(again.context) == 2 * BLOCK and seg.position == 3 * BLOCK


def test_idle_window_completes_a_partial_block_instead_of_dropping_it() -> None:
    seg = Segmenter()
    partial = np.full(1_000, 1_234, np.int16)
    assert seg.push(partial) == []
    window = seg.idle_window()
    assert window.index == 0
    np.testing.assert_array_equal(float_to_int16(window.samples[:1_000]), partial)
    assert not np.any(window.samples[1_000:])
    assert seg.position == BLOCK


def test_idle_window_closes_an_open_utterance(speech_pcm: np.ndarray) -> None:
    seg = Segmenter()
    items = seg.push(speech_pcm[: BLOCK * 3])
    assert any(isinstance(i, VadEvent) and i.kind == "speech_start" for i in items) and seg.in_speech
    seg.idle_window()
    assert not seg.in_speech
    queued = seg.push(np.zeros(10, np.int16))
    assert [e.kind for e in queued if isinstance(e, VadEvent)] == ["speech_end"]


def test_flush_pads_the_tail_and_ends_speech(speech_pcm: np.ndarray) -> None:
    seg = Segmenter()
    items = seg.push(speech_pcm[: BLOCK * 2 + 500]) + seg.flush()
    windows = [i for i in items if isinstance(i, AudioWindow)]
    events = [i.kind for i in items if isinstance(i, VadEvent)]
    assert len(windows) == 3 and windows[-1].speech
    assert events == ["speech_start", "speech_end"]
    assert seg.flush() == []


def test_quiet_noise_is_not_speech() -> None:
    noise = (np.random.default_rng(0).normal(0, 20, 16_000 * 2)).astype(np.int16)  # about -64 dBFS
    items = Segmenter(vad_mode=0).push(noise)
    assert items and not any(isinstance(i, VadEvent) or i.speech for i in items)


def test_rejects_float_input_and_blocks_that_split_vad_frames() -> None:
    with pytest.raises(TypeError):
        Segmenter().push(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="whole"):
        Segmenter(samples_per_block=7_681)
