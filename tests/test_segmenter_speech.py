"""The segmenter on real recordings, resampled to 16 kHz by PyAV exactly as the server does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from liveavatar.generator import AudioWindow
from liveavatar.media_io import decode_audio, float_to_int16
from server.segmenter import Segmenter, VadEvent

ASSETS = Path(__file__).parent / "assets"
BLOCK = 7_680
FRAME = 320


@pytest.fixture(scope="module")
def pauses_pcm() -> np.ndarray:
    audio = decode_audio(ASSETS / "speech_with_pauses_48k.wav")
    assert audio.source_rate == 48_000 and audio.sample_rate == 16_000
    return float_to_int16(audio.samples)


def energy_truth(pcm: np.ndarray, gap_s: float = 0.6) -> np.ndarray:
    """Per 20 ms frame: inside speech by energy, with gaps between words shorter than `gap_s` filled."""
    frames = pcm[: len(pcm) // FRAME * FRAME].astype(np.float32).reshape(-1, FRAME) / 32768.0
    loud = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12) > -45.0
    truth = loud.copy()
    idx = np.flatnonzero(loud)
    max_gap = int(gap_s / 0.02)
    for a, b in zip(idx[:-1], idx[1:], strict=True):
        if 1 < b - a <= max_gap:
            truth[a:b] = True
    return truth


def run(seg: Segmenter, pcm: np.ndarray, chunk: int) -> list[AudioWindow | VadEvent]:
    out: list[AudioWindow | VadEvent] = []
    for start in range(0, len(pcm), chunk):
        out.extend(seg.push(pcm[start : start + chunk]))
    return out + seg.flush()


def windows_of(items: list[AudioWindow | VadEvent]) -> list[AudioWindow]:
    return [item for item in items if isinstance(item, AudioWindow)]


def test_speech_windows_are_where_the_speech_is_and_idle_in_pauses(pauses_pcm: np.ndarray) -> None:
    windows = windows_of(run(Segmenter(), pauses_pcm, 960))
    truth = energy_truth(pauses_pcm)
    per_block = BLOCK // FRAME
    hangover = int(0.6 / 0.02)
    speech_checked = idle_checked = 0
    for w in windows:
        lo, hi = w.index * per_block, (w.index + 1) * per_block
        block_truth = truth[lo:hi]
        if len(block_truth) and block_truth.mean() >= 0.5:
            assert w.speech, f"block {w.index} is mostly speech but came out idle"
            speech_checked += 1
        elif not truth[max(0, lo - hangover) : hi].any():
            assert not w.speech, f"block {w.index} lies in a pause but came out as speech"
            idle_checked += 1
    assert speech_checked >= 30 and idle_checked >= 8


def test_windows_cover_the_stream_exactly_once_with_context(pauses_pcm: np.ndarray) -> None:
    windows = windows_of(run(Segmenter(context_samples=32_000), pauses_pcm, 4_000))
    assert [w.index for w in windows] == list(range(len(windows)))
    assert len(windows) == -(-len(pauses_pcm) // BLOCK)
    joined = np.concatenate([w.samples for w in windows])
    np.testing.assert_array_equal(float_to_int16(joined[: len(pauses_pcm)]), pauses_pcm)
    assert all(w.samples.dtype == np.float32 and len(w.samples) == BLOCK for w in windows)
    assert len(windows[0].context) == 0 and len(windows[1].context) == BLOCK
    assert all(len(w.context) == 32_000 for w in windows[5:])
    np.testing.assert_array_equal(windows[10].context, joined[10 * BLOCK - 32_000 : 10 * BLOCK])


def test_events_bracket_each_utterance_near_its_true_onset(pauses_pcm: np.ndarray) -> None:
    events = [item for item in run(Segmenter(), pauses_pcm, 320) if isinstance(item, VadEvent)]
    kinds = [e.kind for e in events]
    assert kinds == ["speech_start", "speech_end"] * (len(kinds) // 2) and len(kinds) >= 4
    truth = energy_truth(pauses_pcm)
    true_onsets = np.flatnonzero(np.diff(truth.astype(int)) == 1) + 1
    for start in (e for e in events if e.kind == "speech_start"):
        nearest = np.min(np.abs(true_onsets * FRAME - start.sample)) / 16_000
        assert nearest < 0.1, f"onset at {start.seconds():.2f} s is {nearest:.2f} s from the speech"
    for start, end in zip(events[::2], events[1::2], strict=True):
        assert start.sample < end.sample


def test_silence_file_yields_no_speech() -> None:
    pcm = float_to_int16(decode_audio(ASSETS / "silence_48k_3s.wav").samples)
    items = run(Segmenter(vad_mode=0), pcm, 1_000)
    windows = windows_of(items)
    assert len(windows) == -(-len(pcm) // BLOCK) and not any(w.speech for w in windows)
    assert not [item for item in items if isinstance(item, VadEvent)]


def test_chunk_sizes_do_not_change_the_result(pauses_pcm: np.ndarray) -> None:
    pcm = pauses_pcm[: 16_000 * 8]
    reference = run(Segmenter(), pcm, len(pcm))
    rng = np.random.default_rng(3)
    for chunk in (1_003, 320, 7_680, 16_001):
        other = run(Segmenter(), pcm, chunk)
        assert len(other) == len(reference)
        for a, b in zip(reference, other, strict=True):
            assert type(a) is type(b)
            if isinstance(a, VadEvent):
                assert a == b
            else:
                assert (a.index, a.speech) == (b.index, b.speech)
                np.testing.assert_array_equal(a.samples, b.samples)
                np.testing.assert_array_equal(a.context, b.context)
    # Ragged random chunks, fed as raw bytes the way the WebSocket delivers them.
    seg, ragged, pos = Segmenter(), [], 0
    while pos < len(pcm):
        n = int(rng.integers(1, 3_000))
        ragged.extend(seg.push(pcm[pos : pos + n].tobytes()))
        pos += n
    ragged.extend(seg.flush())
    assert [(type(x), getattr(x, "speech", x)) for x in ragged] == [
        (type(x), getattr(x, "speech", x)) for x in reference
    ]
