"""Mic mode end to end on loopback: an aiortc peer speaks speech_en_48k.wav into the server's preview
avatar and checks what comes back: frame rate, audio, A/V offset and a mouth that follows the speech.

A/V offset, as measured here: both tracks start at media time 0 on the session clock (video pts
n*3600 at 90 kHz, audio k*960 at 48 kHz), and RTCP sender reports tie each track's RTP clock to the
server's wall clock. Each report gives the wall-clock time at which that track's media time 0 went
out. aiortc stamps a report with the send time of the latest packet, so single reports jitter by
the encoder's latency (a video frame goes out after encoding); a receiver smooths them (Chrome
fits a line over recent reports), and so do we: the offset is the median video value minus the
median audio value over each half of the run. Both halves must be within 40 ms: no offset, no drift.
(tests/test_server_av_sync.py checks the same by content, beep against flash.)
"""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
from server_peer import ArrayAudioTrack, PeerClient, _rtp_diff, fps_by_arrival

from liveavatar.media_io import decode_audio

SILENCE_S, SPEECH_S, TAIL_S = 1.5, 4.0, 1.5


def mic_signal(assets) -> np.ndarray:
    speech = decode_audio(assets / "speech_en_48k.wav", rate=48_000).samples[: int(SPEECH_S * 48_000)]
    pad = np.zeros(int(SILENCE_S * 48_000), np.float32)
    tail = np.zeros(int(TAIL_S * 48_000), np.float32)
    return (np.concatenate([pad, speech, tail]) * 32767).astype(np.int16)


def av_offsets(client: PeerClient) -> tuple[list[float], float]:
    """Median offset (video minus audio, seconds) over each half of the run, and the per-report spread."""
    got = client.got
    assert got.video[0][1] == 0 and got.audio[0][1] == 0  # the first frames of both tracks arrived
    v0, a0 = got.rtp("video", 0), got.rtp("audio", 0)
    zero_v = [ntp - _rtp_diff(rtp, v0) / 90_000 for ntp, rtp in got.reports["video"]]
    zero_a = [ntp - _rtp_diff(rtp, a0) / 48_000 for ntp, rtp in got.reports["audio"]]
    assert len(zero_v) >= 4 and len(zero_a) >= 4, "too few sender reports"
    mid_v, mid_a = len(zero_v) // 2, len(zero_a) // 2
    halves = [
        float(np.median(zero_v[:mid_v]) - np.median(zero_a[:mid_a])),
        float(np.median(zero_v[mid_v:]) - np.median(zero_a[mid_a:])),
    ]
    spread = float(np.ptp(zero_v) + np.ptp(zero_a))
    return halves, spread


def mouth_box(frame: np.ndarray) -> tuple[int, int, int, int]:
    """Lower middle of the largest detected face (the mouth and jaw), in thumbnail pixels."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    faces = cascade.detectMultiScale(frame, 1.1, 4, minSize=(24, 24))
    assert len(faces), "no face found in the received video"
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return x + w // 4, y + int(h * 0.6), w // 2, int(h * 0.4)


def mouth_motion_by_loudness(client: PeerClient) -> tuple[float, float]:
    """Mean frame-to-frame change in the mouth box while the paired audio is loud vs. in silence.

    Silence means no sound within 0.3 s either side: right after a word the mouth is still closing,
    which is speech motion too.
    """
    got = client.got
    frames = [(pts, img) for _, pts, img in got.video]
    x, y, w, h = mouth_box(frames[len(frames) // 2][1])
    audio, audio_pts0 = got.audio_signal()
    audio_t0 = got.sender_time("audio", audio_pts0)
    changes, levels = [], []
    for (prev_pts, prev), (pts, img) in zip(frames, frames[1:], strict=False):
        if pts - prev_pts != 3600:
            continue  # frames the server skipped (encoder behind) would count as one big change
        start = int((got.sender_time("video", pts) - audio_t0) * 48_000)
        chunk = audio[max(0, start) : max(0, start) + 1920].astype(np.float32) / 32768
        if len(chunk) < 1920:
            continue
        changes.append(float(np.mean(np.abs(img[y : y + h, x : x + w].astype(np.int16) - prev[y : y + h, x : x + w]))))
        levels.append(float(np.sqrt(np.mean(chunk**2))))
    near = 8  # frames, about 0.3 s
    loud = [c for c, lvl in zip(changes, levels, strict=True) if lvl > 0.03]
    quiet = [c for i, c in enumerate(changes) if max(levels[max(0, i - near) : i + near + 1]) < 0.003]
    assert len(loud) > 20 and len(quiet) > 20, (len(loud), len(quiet))
    return float(np.mean(loud)), float(np.mean(quiet))


async def test_mic_session_streams_smooth_synced_video_whose_mouth_follows_speech(start_server, assets) -> None:
    app = await start_server()
    client = await PeerClient(app.url.replace("http", "ws") + "ws", thumb=256).connect()
    try:
        answer = await client.start(mode="mic", mic=ArrayAudioTrack(mic_signal(assets)))
        assert answer["videoCodec"] == "VP8"
        await asyncio.sleep(SILENCE_S + SPEECH_S + TAIL_S + 1.0)
        session = app.registry.get(answer["session"])
        lag = session.snapshot()
        onset = await client.wait_for("speech_start", timeout=1)
    finally:
        await client.close()

    got = client.got
    video_fps = fps_by_arrival([t for t, _, _ in got.video])
    audio_s = sum(len(a) for _, _, a in got.audio) / 48_000
    offsets, spread = av_offsets(client)
    loud, quiet = mouth_motion_by_loudness(client)
    print(
        f"mic session: {video_fps:.1f} fps, {audio_s:.1f} s audio, A/V offset "
        f"{offsets[0] * 1000:+.1f} / {offsets[1] * 1000:+.1f} ms "
        f"(1st / 2nd half; report jitter {spread * 1000:.0f} ms), "
        f"lag {lag.lag_s and lag.lag_s * 1000:.0f} ms, onset lag {lag.onset_lag_s and lag.onset_lag_s * 1000:.0f} ms, "
        f"mouth change {loud:.2f} (speech) vs {quiet:.2f} (silence)"
    )
    assert video_fps >= 24
    first, settled = got.video[0][2].astype(np.int16), got.video[len(got.video) // 2][2]
    assert np.mean(np.abs(first - settled)) < 20  # the stream opens on the avatar's poster, not black
    assert audio_s > SILENCE_S + SPEECH_S
    # `at` is in stream seconds; the idle blocks made while the peers connected come before the mic's audio
    mic_at = onset["at"] - session.stream.feed.mic_origin / session.stream.rate
    assert 1.0 < mic_at < SILENCE_S + 0.6, onset  # the VAD found the speech where it starts in the mic audio
    assert max(abs(o) for o in offsets) <= 0.040
    assert loud > 2 * quiet
    assert lag.onset_lag_s is not None and lag.onset_lag_s < 1.5
