"""When video falls behind, video drops frames and the audio stays whole and in sync.

The server's event loop is stalled 250 ms after every 10th video frame (a video encode that holds
the loop, the way CPU pressure does): both senders fall behind. The video track skips the frames it
is late for; the audio track must send every 20 ms frame, late ones in a burst, so the receiver gets
the whole sound on the clock's media timeline.
"""

from __future__ import annotations

import time

import numpy as np
from server_peer import PeerClient

from server.media import AUDIO_FRAME_SAMPLES, AUDIO_RATE
from server.tracks import ClockVideoTrack

STALL_S = 0.25
STALL_EVERY = 10
STREAM_S = 6.0


async def test_audio_stays_whole_and_in_sync_while_a_slow_video_encode_drops_frames(start_server, monkeypatch) -> None:
    original = ClockVideoTrack.recv
    sent = {"n": 0}

    async def slow_recv(self: ClockVideoTrack):
        frame = await original(self)
        sent["n"] += 1
        if sent["n"] % STALL_EVERY == 0:
            time.sleep(STALL_S)  # holds the event loop, as an encoder starved of CPU does
        return frame

    monkeypatch.setattr(ClockVideoTrack, "recv", slow_recv)
    app = await start_server()
    client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
    try:
        await client.start(mode="push")
        await client.wait_frames(5, timeout=20)
        session = app.registry.get(client.session)
        tone = (np.sin(2 * np.pi * 220 * np.arange(int(16_000 * STREAM_S)) / 16_000) * 8000).astype(np.int16)
        await client.send(client.push_b64(tone))
        await client.send({"type": "push_end"})
        await client.wait_for("finished", timeout=STREAM_S + 15)
    finally:
        await client.close()
    video_pts = [pts for _, pts, _ in client.got.video]
    audio = client.got.audio
    audio_pts = [pts for _, pts, _ in audio]
    received = sum(len(a) for _, _, a in audio)
    span = audio_pts[-1] - audio_pts[0] + AUDIO_FRAME_SAMPLES
    dropped_video = session.transport.video.dropped
    video_end_s, audio_end_s = video_pts[-1] / 90_000, audio_pts[-1] / AUDIO_RATE
    print(
        f"\nvideo: {len(video_pts)} frames, {dropped_video} dropped by the track; audio: {received / AUDIO_RATE:.2f} s "
        f"received of {span / AUDIO_RATE:.2f} s of media time ({100 * received / span:.1f} %), "
        f"{session.transport.audio.skipped} frames skipped by the track; last media time video {video_end_s:.2f} s, "
        f"audio {audio_end_s:.2f} s"
    )
    assert dropped_video > 0, "the stalls did not make the video fall behind: the test tests nothing"
    assert session.transport.audio.skipped == 0
    assert received >= 0.99 * span
    # in sync: the audio's media time has kept up with the video's (no backlog left behind)
    assert abs(video_end_s - audio_end_s) < 0.2
