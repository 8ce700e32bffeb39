"""A GStreamer webrtcbin peer for the interop tests, run as a child process under Debian's Python.

Debian's PyGObject (python3-gi) belongs to /usr/bin/python3, not to the project's interpreter, so
this script imports nothing from the project and talks to the test over its standard streams, one
JSON object per line:

  out {"offer": sdp}            the offer (webrtcbin trickles its candidates after it)
  out {"ice": candidate, "mline": n}
  in  {"answer": sdp}           the server's answer
  in  {"stop": true}            end the run
  out {"report": {...}}         connect and first-frame times, video PTS (media time), audio samples

    /usr/bin/python3 tests/gst_peer.py --mode mic|push --codec vp8|h264
"""

from __future__ import annotations

import argparse
import array
import json
import sys
import threading
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

VIDEO_CAPS = {
    "vp8": "application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000",
    "h264": "application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000,"
    "packetization-mode=(string)1,profile-level-id=(string)42e01f,level-asymmetry-allowed=(string)1",
}
AUDIO_CAPS = "application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000"
# The mic: a live tone, paced by the pipeline clock like a capture device.
MIC = (
    "audiotestsrc is-live=true wave=sine freq=330 volume=0.3 ! audioconvert ! audioresample ! "
    f'opusenc ! rtpopuspay pt=111 ! capsfilter caps="{AUDIO_CAPS}"'
)


def say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Peer:
    def __init__(self, mode: str, codec: str) -> None:
        self.t0 = time.monotonic()
        self.report: dict = {
            "connected_s": None,
            "first_frame_s": None,
            "video_pts": [],
            "audio_samples": 0,
            "audio_sum_squares": 0.0,
            "states": [],
        }
        self.pipe = Gst.Pipeline.new("peer")
        self.webrtc = Gst.ElementFactory.make("webrtcbin", "webrtc")
        self.webrtc.set_property("bundle-policy", GstWebRTC.WebRTCBundlePolicy.MAX_BUNDLE)
        self.pipe.add(self.webrtc)
        if mode == "mic":  # linking requests a sendrecv audio transceiver
            mic = Gst.parse_bin_from_description(MIC, True)
            self.pipe.add(mic)
            mic.link(self.webrtc)
        recv = GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY
        if mode == "push":
            self.webrtc.emit("add-transceiver", recv, Gst.Caps.from_string(AUDIO_CAPS))
        self.webrtc.emit("add-transceiver", recv, Gst.Caps.from_string(VIDEO_CAPS[codec]))
        self.webrtc.connect("on-negotiation-needed", self._negotiate)
        self.webrtc.connect("on-ice-candidate", lambda _w, mline, c: say({"ice": c, "mline": mline}))
        self.webrtc.connect("pad-added", self._incoming)
        self.webrtc.connect("notify::ice-connection-state", self._ice_state)
        self.loop = GLib.MainLoop()

    def _negotiate(self, webrtc: Gst.Element) -> None:
        webrtc.emit("create-offer", None, Gst.Promise.new_with_change_func(self._offer_made, None))

    def _offer_made(self, promise: Gst.Promise, _data: object) -> None:
        reply = promise.get_reply()
        offer = reply.get_value("offer")
        if offer is None:
            print(reply.to_string(), file=sys.stderr)
            return
        self.webrtc.emit("set-local-description", offer, Gst.Promise.new())
        self.t0 = time.monotonic()
        say({"offer": offer.sdp.as_text()})

    def answer(self, sdp: str) -> None:
        _, message = GstSdp.SDPMessage.new_from_text(sdp)
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())

    def _ice_state(self, webrtc: Gst.Element, _spec: object) -> None:
        state = webrtc.get_property("ice-connection-state").value_nick
        self.report["states"].append(state)
        if state in ("connected", "completed") and self.report["connected_s"] is None:
            self.report["connected_s"] = time.monotonic() - self.t0

    def _incoming(self, _webrtc: Gst.Element, pad: Gst.Pad) -> None:
        if pad.direction != Gst.PadDirection.SRC:
            return
        decode = Gst.ElementFactory.make("decodebin")
        decode.connect("pad-added", self._decoded)
        self.pipe.add(decode)
        decode.sync_state_with_parent()
        pad.link(decode.get_static_pad("sink"))

    def _decoded(self, _decodebin: Gst.Element, pad: Gst.Pad) -> None:
        kind = pad.get_current_caps().get_structure(0).get_name()
        if kind.startswith("video/"):
            chain = "videoconvert ! fakesink name=vsink sync=false"
        elif kind.startswith("audio/"):
            chain = "audioconvert ! audio/x-raw,format=F32LE,channels=1 ! fakesink name=asink sync=false"
        else:
            return
        bin_ = Gst.parse_bin_from_description(chain, True)
        self.pipe.add(bin_)
        bin_.sync_state_with_parent()
        pad.link(bin_.get_static_pad("sink"))
        sink = bin_.get_by_name("vsink" if kind.startswith("video/") else "asink")
        probe = self._video_buffer if kind.startswith("video/") else self._audio_buffer
        sink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, probe)

    def _video_buffer(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        buffer = info.get_buffer()
        if self.report["first_frame_s"] is None:
            self.report["first_frame_s"] = time.monotonic() - self.t0
        self.report["video_pts"].append(buffer.pts / Gst.SECOND if buffer.pts != Gst.CLOCK_TIME_NONE else None)
        return Gst.PadProbeReturn.OK

    def _audio_buffer(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        buffer = info.get_buffer()
        ok, mapped = buffer.map(Gst.MapFlags.READ)
        if ok:
            samples = array.array("f", bytes(mapped.data))
            buffer.unmap(mapped)
            self.report["audio_samples"] += len(samples)
            self.report["audio_sum_squares"] += 4 * sum(s * s for s in samples[::4])  # a quarter is plenty
        return Gst.PadProbeReturn.OK

    def run(self) -> None:
        threading.Thread(target=self._read_commands, daemon=True).start()
        self.pipe.set_state(Gst.State.PLAYING)
        self.loop.run()
        self.pipe.set_state(Gst.State.NULL)
        say({"report": self.report})

    def _read_commands(self) -> None:
        for line in sys.stdin:
            message = json.loads(line)
            if "answer" in message:
                GLib.idle_add(self.answer, message["answer"])
            if message.get("stop"):
                break
        GLib.idle_add(self.loop.quit)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("mic", "push"), default="mic")
    parser.add_argument("--codec", choices=tuple(VIDEO_CAPS), default="vp8")
    args = parser.parse_args()
    Gst.init(None)
    Peer(args.mode, args.codec).run()


if __name__ == "__main__":
    main()
