"""Mic mode end to end on loopback: an aiortc peer speaks speech_en_48k.wav into the server's preview
avatar and checks what comes back: frame rate, audio, A/V offset and a mouth that follows the speech.

A/V offset, as measured here: both tracks start at media time 0 on the session clock (video pts
n*3600 at 90 kHz, audio k*960 at 48 kHz), and RTCP sender reports tie each track's RTP clock to the
server's wall clock. For every sender report we compute the wall-clock time at which that track's
media time 0 went out; the difference between the video and the audio value is the offset a
receiver lining up lips and sound by RTCP would see. It must stay within 40 ms for the whole run.
"""

from __future__ import annotations

import asyncio

import cv2
import numpy as np

from liveavatar.media_io import decode_audio
from server_peer import ArrayAudioTrack, PeerClient, _rtp_diff, fps_by_arrival

SILENCE_S, SPEECH_S, TAIL_S = 1.5, 4.0, 1.5


def mic_signal(assets) -> np.ndarray:
    speech = decode_audio(assets / "speech_en_48k.wav", rate=48_000).samples[: int(SPEECH_S * 48_000)]
    pad = np.zeros(int(SILENCE_S * 48_000), np.float32)
    tail = np.zeros(int(TAIL_S * 48_000), np.float32)
    return (np.concatenate([pad, speech, tail]) * 32767).astype(np.int16)


def av_offsets(client: PeerClient) -> list[float]:
    """Per sender-report pair: wall time of video media-time 0 minus that of audio (seconds)."""
    got = client.got
    assert got.video[0][1] == 0 and got.audio[0][1] == 0  # the first frames of both tracks arrived
    v0, a0 = got.rtp("video", 0), got.rtp("audio", 0)
    zero_v = [ntp - _rtp_diff(rtp, v0) / 90_000 for ntp, rtp in got.reports["video"]]
    zero_a = [ntp - _rtp_diff(rtp, a0) / 48_000 for ntp, rtp in got.reports["audio"]]
    return [v - a for v, a in zip(zero_v, zero_a, strict=False)]


def mouth_box(frame: np.ndarray) -> tuple[int, int, int, int]:
    """Lower middle of the largest detected face (the mouth and jaw), in thumbnail pixels."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    faces = cascade.detectMultiScale(frame, 1.1, 4, minSize=(24, 24))
    assert len(faces), "no face found in the received video"
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return x + w // 4, y + int(h * 0.6), w // 2, int(h * 0.4)


def mouth_motion_by_loudness(client: PeerClient) -> tuple[float, float]:
    """Mean frame-to-frame change in the mouth box while the paired audio is loud vs. silent."""
    got = client.got
    frames = [(pts, img) for _, pts, img in got.video]
    x, y, w, h = mouth_box(frames[len(frames) // 2][1])
    audio, audio_pts0 = got.audio_signal()
    audio_t0 = got.sender_time("audio", audio_pts0)
    loud, quiet = [], []
    for (_, prev), (pts, img) in zip(frames, frames[1:], strict=False):
        change = float(np.mean(np.abs(img[y : y + h, x : x + w].astype(np.int16) - prev[y : y + h, x : x + w])))
        start = int((got.sender_time("video", pts) - audio_t0) * 48_000)
        chunk = audio[max(0, start) : max(0, start) + 1920].astype(np.float32) / 32768
        if len(chunk) < 1920:
            continue
        rms = float(np.sqrt(np.mean(chunk**2)))
        (loud if rms > 0.03 else quiet if rms < 0.003 else []).append(change)
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
    offsets = av_offsets(client)
    loud, quiet = mouth_motion_by_loudness(client)
    print(
        f"mic session: {video_fps:.1f} fps, {audio_s:.1f} s audio, A/V offset "
        f"{min(offsets) * 1000:+.1f}..{max(offsets) * 1000:+.1f} ms over {len(offsets)} reports, "
        f"lag {lag.lag_s and lag.lag_s * 1000:.0f} ms, onset lag {lag.onset_lag_s and lag.onset_lag_s * 1000:.0f} ms, "
        f"mouth change {loud:.2f} (speech) vs {quiet:.2f} (silence)"
    )
    assert video_fps >= 24
    assert audio_s > SILENCE_S + SPEECH_S
    assert 1.0 < onset["at"] < SILENCE_S + 0.6  # the VAD found the speech where it starts
    assert len(offsets) >= 3 and max(abs(o) for o in offsets) <= 0.040
    assert loud > 1.5 * quiet
    assert lag.onset_lag_s is not None and lag.onset_lag_s < 1.5
