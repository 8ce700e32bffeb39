"""The input feed's bookkeeping for push mode: utterances, windows, idle padding, interrupt, limits."""

from __future__ import annotations

import numpy as np
import pytest

from server.feed import AudioFeed
from server.protocol import ProtocolError
from server.segmenter import Segmenter

BLOCK = 7680


def feed(**kw) -> tuple[AudioFeed, list]:
    events: list = []
    return AudioFeed(Segmenter(), lambda e, _t: events.append(e.kind), **kw), events


def tone(samples: int) -> np.ndarray:
    return (np.sin(np.arange(samples) / 5) * 9000).astype(np.int16)


def drain(f: AudioFeed) -> list:
    out = []
    while (item := f.pop()) is not None:
        out.append(item)
    return out


def test_an_utterance_is_cut_into_blocks_and_padded_at_push_end() -> None:
    f, _ = feed()
    utt = f.push(tone(BLOCK + 1000), now=1.0)
    assert [w.start for w in drain(f)] == [0]  # one whole block so far
    f.push(tone(500), now=1.1)
    assert f.push_end() is utt and utt.ended
    windows = drain(f)
    assert [w.start for w in windows] == [BLOCK]
    assert utt.intervals == [(0, BLOCK + 1500)] and utt.end == BLOCK + 1500
    assert windows[0].utterances == [utt] and not windows[0].preemptible
    assert not windows[0].window.samples[1500:].any()  # the padding is silence


def test_only_an_utterances_first_block_carries_an_arrival_time() -> None:
    f, _ = feed()
    f.push(tone(3 * BLOCK), now=5.0)
    arrivals = [w.arrival for w in drain(f)]
    assert arrivals == [5.0, None, None]


def test_idle_padding_between_two_pushes_is_not_part_of_the_utterance() -> None:
    f, _ = feed()
    utt = f.push(tone(1000), now=0.0)
    idle = f.idle()  # the generator needed a block before more audio came
    f.push(tone(BLOCK), now=0.5)
    assert idle.utterances == [utt]
    assert utt.intervals == [(0, 1000), (BLOCK, 2 * BLOCK)]
    assert utt.offset_of(BLOCK + 10) == 1010 and utt.offset_of(3000) is None
    assert f.locate(BLOCK + 10) == (utt, 1010)


def test_interrupt_drops_queued_windows_and_cuts_open_utterances() -> None:
    f, _ = feed()
    first = f.push(tone(2 * BLOCK + 100), now=0.0)
    epoch = f.epoch
    cut = f.interrupt()
    assert cut == [first] and first.interrupted and first.ended
    assert f.pending == 0 and f.epoch == epoch + 1
    assert f.segmenter.position % BLOCK == 0  # the partial block left the stream too
    second = f.push(tone(BLOCK), now=1.0)
    assert second.id == first.id + 1
    assert [w.epoch for w in drain(f)] == [epoch + 1]


def test_push_end_without_audio_finishes_at_once() -> None:
    f, _ = feed()
    f.push(np.zeros(0, np.int16))
    utt = f.push_end()
    assert utt is not None and utt.finished and f.utterances == []


def test_pushing_beyond_the_limit_is_refused() -> None:
    f, _ = feed(max_push_seconds=1.0)
    f.push(tone(12_000))
    with pytest.raises(ProtocolError) as info:
        f.push(tone(8_000))
    assert info.value.code == "push_buffer_full"


def test_mic_audio_keeps_the_queue_bounded_by_dropping_idle_windows_first() -> None:
    f, _ = feed(max_pending_windows=2)
    for k in range(5):
        f.feed_mic(np.zeros(BLOCK, np.int16), now=float(k))
    assert f.pending == 2 and f.dropped_windows == 3
    assert [w.start for w in drain(f)] == [3 * BLOCK, 4 * BLOCK]
    assert f.mic_live(4.1) and not f.mic_live(5.0)


def test_mic_origin_is_where_the_mic_audio_starts_after_idle_blocks_made_while_connecting() -> None:
    f, _ = feed()
    f.idle()
    f.idle()  # no mic yet: two idle blocks keep the clock fed
    f.feed_mic(np.zeros(BLOCK // 2, np.int16), now=0.0)
    f.feed_mic(np.zeros(BLOCK, np.int16), now=0.1)
    assert f.mic_origin == 2 * BLOCK
