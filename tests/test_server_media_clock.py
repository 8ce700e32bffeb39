"""The per-session media clock: one timeline for both tracks, back-pressure, idle preemption, filler."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from server.media import AUDIO_RATE, Block, MediaClock, Upsampler
from server.tracks import ClockAudioTrack, ClockVideoTrack

FPS = 25
SPS = AUDIO_RATE // FPS  # audio samples per video frame


def tagged_block(tag: int, frames: int = 3, preemptible: bool = False) -> Block:
    """Frame i of block `tag` has pixel value 10*tag + i, and its audio slice carries the same number."""
    values = [10 * tag + i for i in range(frames)]
    images = np.stack([np.full((16, 16, 3), v, np.uint8) for v in values])
    audio = np.concatenate([np.full(SPS, v, np.int16) for v in values])
    return Block(images, audio, preemptible, meta=tag)


def blank() -> np.ndarray:
    return np.zeros((16, 16, 3), np.uint8)


async def test_video_frame_and_audio_of_a_slot_carry_the_same_content_and_media_time() -> None:
    clock = MediaClock(FPS, blank())
    await clock.put(tagged_block(1))
    await clock.put(tagged_block(2))
    video, audio = ClockVideoTrack(clock), ClockAudioTrack(clock)
    for n in range(6):
        vf = await video.recv()
        afs = [await audio.recv(), await audio.recv()]
        value = int(vf.to_ndarray(format="rgb24")[0, 0, 0])
        assert value == [10, 11, 12, 20, 21, 22][n]
        for af in afs:
            assert set(af.to_ndarray().reshape(-1).tolist()) == {value}
        # Same media time on both tracks: pts / clock rate.
        assert vf.pts / 90_000 == pytest.approx(afs[0].pts / AUDIO_RATE)
    assert clock.filler_slots == 0


async def test_tracks_are_paced_by_the_clock_not_by_their_callers() -> None:
    clock = MediaClock(FPS, blank())
    video = ClockVideoTrack(clock)
    start = time.monotonic()
    for _ in range(5):
        await video.recv()
    elapsed = time.monotonic() - start
    assert 0.14 <= elapsed < 0.4  # slots 0..4 are due at 0, 40, ..., 160 ms


async def test_a_late_generator_gets_filler_slots_with_the_last_image_and_silence() -> None:
    clock = MediaClock(FPS, blank())
    await clock.put(tagged_block(1, frames=2))
    slots = [clock.slot(n) for n in range(4)]
    assert [int(s.image[0, 0, 0]) for s in slots] == [10, 11, 11, 11]
    assert not slots[2].audio.any() and not slots[3].audio.any()
    assert clock.filler_slots == 2


async def test_a_real_block_cuts_a_playing_idle_block_at_the_next_slot() -> None:
    ended: list[tuple[int, int]] = []
    clock = MediaClock(FPS, blank(), on_block_end=lambda b, _t, played: ended.append((b.meta, played)))
    await clock.put(tagged_block(1, frames=6, preemptible=True))
    await clock.put(tagged_block(2, frames=6, preemptible=True))
    assert int(clock.slot(0).image[0, 0, 0]) == 10
    assert int(clock.slot(1).image[0, 0, 0]) == 11
    await clock.put(tagged_block(3, frames=2))  # speech arrives: both idle blocks give way
    assert [int(clock.slot(n).image[0, 0, 0]) for n in (2, 3)] == [30, 31]
    assert ended == [(1, 2), (3, 2)]


async def test_put_waits_while_the_queue_is_full() -> None:
    clock = MediaClock(FPS, blank(), max_blocks=2)
    await clock.put(tagged_block(1))
    await clock.put(tagged_block(2))
    third = asyncio.create_task(clock.put(tagged_block(3)))
    await asyncio.sleep(0.05)
    assert not third.done()
    clock.slot(0)  # block 1 starts playing: one place frees up
    await asyncio.wait_for(third, 1)
    assert clock.queued_blocks == 3  # one playing, two queued


async def test_flush_drops_queued_blocks_but_the_playing_block_finishes() -> None:
    clock = MediaClock(FPS, blank())
    await clock.put(tagged_block(1))
    await clock.put(tagged_block(2))
    clock.slot(0)
    dropped = clock.flush()
    assert [b.meta for b in dropped] == [2]
    assert [int(clock.slot(n).image[0, 0, 0]) for n in (1, 2, 3)] == [11, 12, 12]


async def test_an_obsolete_block_is_not_queued_after_waiting() -> None:
    clock = MediaClock(FPS, blank(), max_blocks=1)
    await clock.put(tagged_block(1))
    epoch = {"now": 0}
    waiting = asyncio.create_task(clock.put(tagged_block(2), valid=lambda: epoch["now"] == 0))
    await asyncio.sleep(0.01)
    epoch["now"] = 1  # an interrupt happened while it waited
    clock.flush()
    await asyncio.wait_for(waiting, 1)
    assert clock.queued_blocks == 0


async def test_video_skips_ahead_when_its_encoder_falls_behind() -> None:
    clock = MediaClock(FPS, blank())
    video = ClockVideoTrack(clock, max_late_slots=2)
    await video.recv()
    await asyncio.sleep(0.25)  # a stalled encoder: about 6 slots late
    frame = await video.recv()
    assert frame.pts // 3600 >= 5 and video.dropped >= 4


def test_upsampler_joins_blocks_seamlessly_and_keeps_pitch_and_level() -> None:
    t = np.arange(16_000) / 16_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    whole = Upsampler()(tone)
    pieces = Upsampler()
    split = np.concatenate([pieces(tone[i : i + 7680]) for i in range(0, 16_000, 7680)])
    assert len(whole) == 48_000 and np.array_equal(whole, split)
    spectrum = np.abs(np.fft.rfft(whole[4800:].astype(np.float64)))
    peak_hz = np.argmax(spectrum) * AUDIO_RATE / (len(whole) - 4800)
    assert abs(peak_hz - 440) < 2
    rms = np.sqrt(np.mean((whole[4800:] / 32767.0) ** 2))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.03)


async def test_a_block_later_than_its_deadline_skips_its_first_frames_so_lag_cannot_creep() -> None:
    starts: list[int] = []
    clock = MediaClock(FPS, blank(), on_block_start=lambda b, _t, first: starts.append(first))
    t0 = clock.ensure_started()
    on_time = tagged_block(1, frames=6)
    on_time.deadlines = [t0 + 0.02 + k / FPS for k in range(6)]  # starts at slot 0, 20 ms early: in full
    late = tagged_block(2, frames=6)
    # due at slot 6 (0.24 s); frame k's audio arrived 130 ms too early for slot 6 + k: frames 0-3 would
    # exceed the bound (by 130, 90, 50, 10 ms), frame 4 is the first within it
    late.deadlines = [t0 + 0.24 - 0.13 + k * 0.04 for k in range(6)]
    await clock.put(on_time)
    await clock.put(late)
    values = [int(clock.slot(n).image[0, 0, 0]) for n in range(8)]
    assert values[:6] == [10, 11, 12, 13, 14, 15]
    assert values[6:] == [24, 25]  # four frames (and their audio) skipped: none shows past its deadline
    assert starts == [0, 4] and clock.trimmed_frames == 4
    assert set(clock.slot(6).audio.tolist()) == {24}


async def test_a_block_whose_every_frame_is_past_its_deadline_is_dropped_and_the_next_plays() -> None:
    starts: list[int] = []
    clock = MediaClock(FPS, blank(), on_block_start=lambda b, _t, first: starts.append(first))
    t0 = clock.ensure_started()
    stale = tagged_block(1, frames=3)
    stale.deadlines = [t0 - 1.0] * 3  # a second too late for every frame
    fresh = tagged_block(2, frames=3)
    fresh.deadlines = [t0 + 1.0] * 3
    await clock.put(stale)
    await clock.put(fresh)
    assert [int(clock.slot(n).image[0, 0, 0]) for n in range(3)] == [20, 21, 22]
    assert starts == [0] and clock.dropped_late_blocks == 1 and clock.trimmed_frames == 3


async def test_the_poster_fills_until_the_first_block_and_never_after() -> None:
    clock = MediaClock(FPS, blank())
    clock.show_until_first_block(np.full((16, 16, 3), 99, np.uint8))
    assert int(clock.slot(0).image[0, 0, 0]) == 99  # generation not out yet: the poster, not black
    await clock.put(tagged_block(1, frames=2))
    clock.show_until_first_block(np.full((16, 16, 3), 77, np.uint8))  # too late: a block is playing
    assert [int(clock.slot(n).image[0, 0, 0]) for n in range(1, 5)] == [10, 11, 11, 11]


async def test_catch_up_skips_only_as_many_frames_as_are_queued_behind_the_block() -> None:
    """Catch-up deadlines give a lag back by bringing queued media forward; with nothing queued behind
    (the generator is what is late) a skip would only leave empty slots, so none is made."""
    clock = MediaClock(FPS, blank(), max_blocks=3)
    t0 = clock.ensure_started()
    alone = tagged_block(1, frames=6, preemptible=True)
    alone.deadlines = [t0 + 1.0] * 6  # well within the bound
    alone.catch_up = [t0 - 1.0] * 6  # every frame past the catch-up target
    await clock.put(alone)
    assert [int(clock.slot(n).image[0, 0, 0]) for n in range(6)] == [10, 11, 12, 13, 14, 15]
    assert clock.trimmed_frames == 0 and clock.filler_slots == 0

    ahead = tagged_block(2, frames=6, preemptible=True)
    ahead.deadlines = [t0 + 1.0] * 6
    ahead.catch_up = [t0 - 1.0] * 6
    behind = [tagged_block(3, frames=2, preemptible=True), tagged_block(4, frames=2, preemptible=True)]
    for block in (ahead, *behind):
        await clock.put(block)
    shown = [int(clock.slot(n).image[0, 0, 0]) for n in range(6, 12)]
    assert shown == [24, 25, 30, 31, 40, 41]  # four frames skipped: the four queued behind come forward
    assert clock.trimmed_frames == 4 and clock.filler_slots == 0


async def test_catch_up_keeps_a_blocks_last_frame_and_the_hard_deadline_still_trims_alone() -> None:
    clock = MediaClock(FPS, blank(), max_blocks=3)
    t0 = clock.ensure_started()
    ahead = tagged_block(1, frames=4, preemptible=True)
    ahead.catch_up = [t0 - 1.0] * 4  # every frame past the catch-up target, and 12 frames queued behind
    behind = [tagged_block(2, frames=6, preemptible=True), tagged_block(3, frames=6, preemptible=True)]
    for block in (ahead, *behind):
        await clock.put(block)
    assert int(clock.slot(0).image[0, 0, 0]) == 13  # three skipped, the last frame kept: no empty block
    assert clock.trimmed_frames == 3 and clock.dropped_late_blocks == 0

    late = tagged_block(4, frames=4, preemptible=True)
    late.deadlines = [t0 - 1.0, t0 - 1.0, t0 + 5.0, t0 + 5.0]  # the bound: frames 0 and 1 are too late
    late.catch_up = [t0 - 1.0] * 4  # nothing will be queued behind it: catch-up adds no skip
    await clock.put(late)
    shown = [int(clock.slot(n).image[0, 0, 0]) for n in range(1, 15)]
    assert shown[-2:] == [42, 43] and clock.trimmed_frames == 3 + 2
