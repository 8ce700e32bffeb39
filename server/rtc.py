"""The aiortc details of a session: ICE configuration, offer checks, codec choice, the answer.

The video codec follows the browser: aiortc keeps the order of the codecs in the offer, so a browser
that prefers H.264 (RTCRtpTransceiver.setCodecPreferences) gets H.264, otherwise VP8. The server can
force one codec (`video_codec`) through the same mechanism on its own transceiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcicetransport import RTCIceCandidate

from server.ice import RemoteCandidates, offer_candidates, offer_for_aiortc
from server.protocol import ProtocolError

log = logging.getLogger(__name__)
_RECEIVES = ("recvonly", "sendrecv")
_SENDS = ("sendonly", "sendrecv")
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
_FINGERPRINT_BYTES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
"""The DTLS fingerprints aiortc can check (an offer with only MD5 or SHA-1 could never connect)."""


def check_offer(text: str, mode: str) -> aiortc_sdp.SessionDescription:
    """Reject offers the session cannot use before any resources are spent on them: each problem
    gets its own `bad_sdp` message, instead of a session that holds a slot and never connects."""
    if not text.lstrip().startswith("v=0"):
        raise ProtocolError("bad_sdp", "the offer is not an SDP description (it must start with v=0)")
    try:
        desc = aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # the parser raises whatever the broken line provokes
        raise ProtocolError("bad_sdp", f"cannot parse the offer: {exc!r}") from None
    for kind in ("audio", "video"):
        count = sum(m.kind == kind for m in desc.media)
        if count > 1:
            # Every m-line gets a transceiver; a second one would receive (and decode) a track that
            # nothing reads, piling frames up in aiortc's unbounded queue.
            raise ProtocolError(
                "bad_sdp", f"the offer has {count} {kind} m-lines; a session takes at most one audio and one video"
            )
    video = next((m for m in desc.media if m.kind == "video"), None)
    audio = next((m for m in desc.media if m.kind == "audio"), None)
    if video is None or video.direction not in _RECEIVES:
        raise ProtocolError("bad_sdp", "the offer must receive video (a recvonly or sendrecv video m-line)")
    if mode == "mic" and (audio is None or audio.direction not in _SENDS):
        raise ProtocolError("bad_sdp", "mic mode needs the offer to send audio (a sendrecv audio m-line)")
    if audio is None:
        raise ProtocolError(
            "bad_sdp",
            "push mode needs an audio m-line to carry the avatar's voice: add a receive-only audio "
            "transceiver to the offer (addTransceiver('audio', {direction: 'recvonly'}))",
        )
    mids = {m.rtp.muxId for m in desc.media}
    for group in desc.group:
        # aiortc hands the first mid's transport to the group: a mid no m-line carries leaves the
        # others without one, and its connect task fails later, out of anyone's sight
        missing = [mid for mid in group.items if mid not in mids]
        if group.semantic == "BUNDLE" and missing:
            raise ProtocolError(
                "bad_sdp", f"the BUNDLE group names mid {missing[0]!r}, which no m-line has (a=mid:{missing[0]})"
            )
    bundle_only = _bundle_only(text, desc)
    for media in (video, audio):
        _check_media(media, media.rtp.muxId in bundle_only)
    return desc


def _bundle_only(text: str, desc: aiortc_sdp.SessionDescription) -> set[str]:
    """Mids of the m-lines offered bundle-only (RFC 8843 7.2.1: `a=bundle-only` with port 0, in a
    BUNDLE group with an m-line of a real port), as GStreamer's webrtcbin offers with max-bundle: they
    use that m-line's transport, so their port 0 does not mean a rejected m-line."""
    _, media_lines = aiortc_sdp.grouplines(text)
    tagged = {
        m.rtp.muxId
        for m, lines in zip(desc.media, media_lines, strict=False)
        if any(line.strip() == "a=bundle-only" for line in lines)
    }
    ports = {m.rtp.muxId: m.port for m in desc.media}
    found: set[str] = set()
    for group in desc.group:
        mids = [str(mid) for mid in group.items]  # already strings: aiortc parses a session's a=group as str
        if group.semantic == "BUNDLE" and any(ports.get(mid) for mid in mids):
            found.update(mid for mid in mids if mid in tagged)
    return found


def _check_media(media: aiortc_sdp.MediaDescription, bundle_only: bool = False) -> None:
    """One m-line the session uses: it can carry media, and ICE and DTLS can complete on it."""
    kind = media.kind
    if media.port == 0 and not bundle_only:
        raise ProtocolError("bad_sdp", f"the {kind} m-line has port 0 (a rejected m-line); it must be usable")
    if not media.profile.endswith("SAVPF"):
        raise ProtocolError(
            "bad_sdp", f"the {kind} m-line's profile is {media.profile}; WebRTC needs UDP/TLS/RTP/SAVPF (DTLS-SRTP)"
        )
    ours = {c.mimeType.lower() for c in RTCRtpSender.getCapabilities(kind).codecs} - {"video/rtx"}
    if not any(c.mimeType.lower() in ours for c in media.rtp.codecs):
        names = ", ".join(sorted(m.split("/")[1] for m in ours))
        raise ProtocolError("bad_sdp", f"the {kind} m-line offers no codec the server has ({names})")
    ice = media.ice  # None when the offer has no ICE line at all
    ufrag, pwd = (ice.usernameFragment, ice.password) if ice is not None else ("", "")
    for name, value, low in (("ice-ufrag", ufrag, 4), ("ice-pwd", pwd, 22)):
        if not value:
            raise ProtocolError("bad_sdp", f"the {kind} m-line has no {name}")
        if not low <= len(value) <= 256 or not _ICE_CHARS.fullmatch(value):
            raise ProtocolError(
                "bad_sdp", f"the {kind} m-line's {name} must be {low} to 256 characters of A-Z a-z 0-9 + / (RFC 8839)"
            )
    fingerprints = media.dtls.fingerprints if media.dtls is not None else []  # None: no a=fingerprint at all
    usable = [f for f in fingerprints if f.algorithm.lower() in _FINGERPRINT_BYTES]
    if not usable:
        given = ", ".join(sorted({f.algorithm for f in fingerprints})) or "none"
        raise ProtocolError(
            "bad_sdp", f"the {kind} m-line needs a sha-256, sha-384 or sha-512 DTLS fingerprint (given: {given})"
        )
    for f in usable:
        size = _FINGERPRINT_BYTES[f.algorithm.lower()]
        if not re.fullmatch(rf"[0-9A-Fa-f]{{2}}(:[0-9A-Fa-f]{{2}}){{{size - 1}}}", f.value):
            raise ProtocolError("bad_sdp", f"the {kind} m-line's {f.algorithm} fingerprint is not {size} hex bytes")


async def apply_offer(
    pc: RTCPeerConnection,
    offer_sdp: str,
    mode: str,
    video: MediaStreamTrack,
    audio: MediaStreamTrack,
    video_codec: str = "auto",
    candidates: RemoteCandidates | None = None,
) -> tuple[str, str]:
    """Attach our tracks, set the offer, create the answer; returns (answer SDP, video codec name).

    The offer's candidates go to `candidates` once the answer is made (server/ice.py says why)."""
    desc = check_offer(offer_sdp, mode)
    video_tx = pc.addTransceiver(video, direction="sendonly")
    pc.addTransceiver(audio, direction="sendrecv" if mode == "mic" else "sendonly")
    if video_codec != "auto":
        caps = RTCRtpSender.getCapabilities("video").codecs
        chosen = [c for c in caps if c.mimeType.lower() == f"video/{video_codec}"]
        rtx = [c for c in caps if c.mimeType.lower() == "video/rtx"]
        video_tx.setCodecPreferences(chosen + rtx)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_for_aiortc(offer_sdp), type="offer"))
        _watch_connect_tasks(pc)
        await pc.setLocalDescription(await pc.createAnswer())
        _watch_connect_tasks(pc)
    except Exception as exc:  # aiortc raises ValueError/OperationError/... for unusable offers
        raise ProtocolError("bad_sdp", f"cannot use the offer: {exc}") from None
    answer = pc.localDescription.sdp
    if candidates is not None:
        candidates.start(answer)
        found, complete = offer_candidates(desc)
        for candidate in found:
            candidates.add(candidate)
        if complete:
            candidates.add(None)
    codec = ""
    for media in aiortc_sdp.SessionDescription.parse(answer).media:
        if media.kind == "video" and media.rtp.codecs:
            codec = media.rtp.codecs[0].mimeType.split("/")[-1]
    return answer, codec


def _watch_connect_tasks(pc: RTCPeerConnection) -> None:
    """aiortc starts ICE and DTLS in tasks it keeps no reference to (`__connect`, created by
    `setRemoteDescription` and `setLocalDescription`, not run yet when they return). Closed while one
    connects an offer with two transports (no BUNDLE), it fails on the closed one, and its exception
    would go unretrieved: here its outcome is logged instead."""
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        if (
            getattr(coro, "__qualname__", "") == "RTCPeerConnection.__connect"
            and frame is not None
            and frame.f_locals.get("self") is pc
            and not getattr(task, "_liveavatar_watched", False)
        ):
            task._liveavatar_watched = True  # type: ignore[attr-defined]
            task.add_done_callback(_connect_done)


def _connect_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("peer connection setup ended: %r", task.exception())


async def close_peer(pc: RTCPeerConnection) -> None:
    """`pc.close()`, made safe for a connection whose offer aiortc refused half way: it then has a
    transceiver without a transport, `close()` fails on it (aiortc 1.16) and stops nothing after it,
    so the transports that were made are stopped here, or their ICE sockets would stay open."""
    try:
        await pc.close()
    except AttributeError:
        for transceiver in pc.getTransceivers():
            dtls = transceiver.receiver.transport
            if dtls is not None:
                with contextlib.suppress(Exception):
                    await dtls.stop()
                with contextlib.suppress(Exception):
                    await dtls.transport.stop()


def parse_candidate(candidate: str | None, sdp_mid: str | None, mline: int | None) -> RTCIceCandidate | None:
    """A trickled browser candidate -> aiortc's object; None/empty means end of candidates."""
    if not candidate:
        return None
    line = candidate.split(":", 1)[1] if candidate.startswith("candidate:") else candidate
    try:
        parsed = aiortc_sdp.candidate_from_sdp(line)
    except (AssertionError, ValueError, IndexError):
        raise ProtocolError("bad_message", "ice: the candidate line is malformed") from None
    parsed.sdpMid = sdp_mid
    parsed.sdpMLineIndex = 0 if sdp_mid is None and mline is None else mline
    return parsed
