"""Remote ICE candidates and the DTLS role: what lets every mainstream peer connect.

Why the offer is not simply handed to aiortc with its candidates:

- aioice drops an ICE component that has no usable remote candidate once end-of-candidates is
  known, and gathers local candidates only for the components left. An offer whose candidates are
  all unresolvable (Firefox's default offer: `<uuid>.local` mDNS names only, then
  end-of-candidates) therefore got an answer with no candidates at all, and no peer-reflexive path
  could form. The offer aiortc sees carries no candidates; they are added after the answer is made,
  and end-of-candidates is passed on only once at least one of them was usable.
- aioice resolves each mDNS name with a 1 s timeout, and an `ice` message was awaited until it had:
  one connection's message loop stalled ~1 s per trickled candidate. Here every mDNS name is
  resolved in a background task with a shorter timeout.
- aioice checks each new candidate against all known ones, so an offer with thousands of them held
  the event loop for seconds. A session takes at most `MAX_CANDIDATES`.

DTLS: aiortc as DTLS client offers only ECDHE-ECDSA cipher suites, which fail against a peer with an
RSA certificate (GStreamer's webrtcbin). As DTLS server it picks the suite for its own ECDSA
certificate, which every peer accepts. So an `actpass` offer is answered `passive` (RFC 5763 lets
the answerer choose): aiortc is told the peer will be active, which makes it the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from aioice import mdns
from aiortc import RTCPeerConnection
from aiortc import sdp as aiortc_sdp
from aiortc.rtcicetransport import RTCIceCandidate

log = logging.getLogger(__name__)

MAX_CANDIDATES = 100
"""Remote candidates one session uses (offer and trickled together); a dual-stack host with many
interfaces sends a few dozen at most."""
MDNS_TIMEOUT_S = 0.5
"""How long one mDNS name may take to resolve: on a LAN an answer takes milliseconds, and from
outside the peer's LAN it never comes (the peer-reflexive path does not need it)."""


def offer_for_aiortc(text: str) -> str:
    """The offer as aiortc should see it: no candidates (they go through `RemoteCandidates`), and
    `actpass` turned into `active`, so that aiortc answers `passive` and is the DTLS server."""
    kept = []
    for line in text.splitlines():
        if line.startswith("a=candidate:") or line.strip() == "a=end-of-candidates":
            continue
        kept.append("a=setup:active" if line.strip() == "a=setup:actpass" else line)
    return "\r\n".join(kept) + "\r\n"


def offer_candidates(desc: aiortc_sdp.SessionDescription) -> tuple[list[RTCIceCandidate], bool]:
    """The candidates inside a parsed offer (with their m-line), and whether it ended them."""
    found: list[RTCIceCandidate] = []
    for index, media in enumerate(desc.media):
        for candidate in media.ice_candidates:
            candidate.sdpMid, candidate.sdpMLineIndex = media.rtp.muxId or None, index
            found.append(candidate)
    complete = bool(desc.media) and all(m.ice_candidates_complete for m in desc.media)
    return found, complete


class RemoteCandidates:
    """Feeds one session's remote candidates to its peer connection, never making the caller wait.

    Unusable candidates (TCP, which aioice does not do; an address family the server has no
    candidate in; an mDNS name that does not resolve in time; anything aioice rejects) are dropped
    one by one and logged; they never touch the server's own candidates.
    """

    def __init__(self, pc: RTCPeerConnection, session: str, limit: int = MAX_CANDIDATES) -> None:
        self.pc, self.session, self.limit = pc, session, limit
        self.taken = 0
        self.dropped = 0
        self._families: set[int] = set()
        self._ended = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._said_full = False

    def start(self, answer_sdp: str) -> None:
        """Called once the answer is made: which address families the server's candidates have."""
        for media in aiortc_sdp.SessionDescription.parse(answer_sdp).media:
            for candidate in media.ice_candidates:
                with contextlib.suppress(ValueError):
                    self._families.add(ipaddress.ip_address(candidate.ip).version)

    def add(self, candidate: RTCIceCandidate | None) -> None:
        """One remote candidate, or None for end-of-candidates; returns at once."""
        if candidate is None:
            if not self._ended:  # only the first end counts: each end waits for every task before it
                self._ended = True
                self._spawn(self._end())
            return
        why = self._unusable(candidate)
        if why:
            self.dropped += 1
            log.info(
                "session %s: remote candidate %s %s dropped: %s", self.session, candidate.protocol, candidate.ip, why
            )
            return
        self.taken += 1
        self._spawn(self._add(candidate))

    def _unusable(self, candidate: RTCIceCandidate) -> str:
        if self._ended:
            return "after end-of-candidates"
        if self.taken >= self.limit:
            if not self._said_full:
                self._said_full = True
                log.warning(
                    "session %s: more than %d remote candidates; the rest are ignored", self.session, self.limit
                )
            return f"over the limit of {self.limit}"
        if candidate.protocol.lower() != "udp":
            return "only UDP candidates are used"
        if mdns.is_mdns_hostname(candidate.ip):
            return ""
        try:
            family = ipaddress.ip_address(candidate.ip).version
        except ValueError:
            return "not an IP address or an mDNS name"
        if self._families and family not in self._families:
            return f"the server has no IPv{family} candidate"
        return ""

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add(self, candidate: RTCIceCandidate) -> None:
        try:
            async with asyncio.timeout(MDNS_TIMEOUT_S):
                await self.pc.addIceCandidate(candidate)
        except TimeoutError:
            self.dropped += 1
            log.info(
                "session %s: remote candidate %s did not resolve in %.1f s", self.session, candidate.ip, MDNS_TIMEOUT_S
            )
        except Exception as exc:  # a closed connection, a socket the mDNS lookup could not open, ...
            self.dropped += 1
            log.info("session %s: remote candidate %s dropped: %r", self.session, candidate.ip, exc)

    async def _end(self) -> None:
        """End-of-candidates, once every candidate before it is in. Passed on only when one of them
        is usable: with none, aioice would fail at once instead of waiting for peer-reflexive pairs."""
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in list(self._tasks) if t is not current), return_exceptions=True)
        if not self._usable_remote():
            log.info("session %s: no usable remote candidate; waiting for the peer's checks", self.session)
            return
        with contextlib.suppress(Exception):
            await self.pc.addIceCandidate(None)

    def _usable_remote(self) -> bool:
        for transceiver in self.pc.getTransceivers():
            transport = transceiver.receiver.transport
            if transport is not None and transport.transport.getRemoteCandidates():
                return True
        return False

    async def close(self) -> None:
        """Stop whatever is still resolving."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
