"""What the browser tests measure inside the page, the same way in every browser.

Frame rate is judged over media time: `requestVideoFrameCallback` reports each presented frame's RTP
timestamp (90 kHz) and the count of frames presented, so the rate is frames per second of the
stream's own clock, not of the test machine's wall clock (which a busy 2-core runner stretches).
Audio is judged from the receiver's `inbound-rtp` statistics (samples and energy received).
"""

from __future__ import annotations

from typing import Any

INSTALL = """(() => {
  const video = document.getElementById("video");
  window.__probe = [];
  const onFrame = (now, meta) => {
    window.__probe.push([meta.rtpTimestamp ?? null, meta.mediaTime, meta.presentedFrames, now]);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
})()"""
"""Page scope, once the stream plays: start recording presented frames."""

COLLECT = """(async () => {
  const audio = { samples: 0, energy: 0 };
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      audio.samples += s.totalSamplesReceived || 0;
      audio.energy += s.totalAudioEnergy || 0;
    }
  });
  const offer = pc.localDescription ? pc.localDescription.sdp : "";
  window.__probeOut = JSON.stringify({ frames: window.__probe, audio, offer });
  return window.__probeOut;
})()"""
"""Page scope (the page's own `pc`): what was recorded; also left in `window.__probeOut`."""


def media_fps(frames: list[list[Any]]) -> float:
    """Frames presented per second of RTP time (mediaTime where the browser gives no RTP timestamp)."""
    if len(frames) < 2:
        return 0.0
    first, last = frames[0], frames[-1]
    if first[0] is not None and last[0] is not None:
        seconds = ((last[0] - first[0]) % 2**32) / 90_000
    else:
        seconds = last[1] - first[1]
    return (last[2] - first[2]) / seconds if seconds > 0 else 0.0


def offer_candidates(sdp: str) -> list[str]:
    """The address of each candidate line in an SDP."""
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]
