"""Signalling and control messages on the `/ws` WebSocket, as documented types (docs/protocol.md).

Text frames carry one JSON object with a `type`; binary frames carry raw PCM for push mode. Every
client message is parsed here into a frozen dataclass, or rejected with a `ProtocolError` whose code
the client gets back as `{type: "error", code, message}`. Unknown extra fields are ignored so older
servers keep working with newer clients. Every server message is a TypedDict built by its constructor
here (`config(...)`, `stats(...)`, `error(...)`, ...); the server sends no other.

No `from __future__ import annotations` here: TypedDict reads `NotRequired` from real annotations only.
"""

import base64
import binascii
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NotRequired, TypedDict

ERROR_CODES: dict[str, str] = {
    "bad_json": "the text frame is not a JSON object",
    "bad_message": "a field is missing or has the wrong type",
    "unknown_type": "the message type is not one of the documented ones",
    "message_too_large": "the frame is larger than max_message_bytes",
    "bad_sdp": "the offer SDP cannot be used (unparsable, more than one audio or video m-line, ...)",
    "bad_image": "the portrait is not a readable JPG/PNG/WebP image, or one that cannot be framed",
    "upload_too_large": "the portrait is larger than max_upload_bytes or max_image_pixels",
    "bad_audio": "pushed audio is not 16-bit mono PCM at a supported rate",
    "unknown_session": "no such session (or none opened on this connection yet)",
    "forbidden": "the session belongs to another connection, and the message did not carry its token",
    "rate_limited": "more messages than max_messages_per_second; the connection is closed",
    "session_exists": "this connection already has a session; stop it first",
    "server_full": "max_sessions sessions are running",
    "too_many_pending": "this client's earlier sessions are still waiting for their peer connection",
    "wrong_mode": "the request needs a session in the other mode",
    "push_buffer_full": "more pushed audio is waiting than max_push_seconds",
    "busy": "no room for another session now (memory or real-time capacity); retry after retryAfterS",
    "out_of_memory": "the GPU ran out of memory generating this session's block; the session was closed",
    "generation_failed": "the generator failed on this session's block; the session was closed",
    "internal": "the server failed on this request; this connection's session (if any) was closed",
    "replica_lost": "cluster: the replica running this session died or became unreachable; start a new session",
}

PUSH_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)


class ProtocolError(Exception):
    """A request the server refuses; sent back to the client as an `error` message."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        """Sent as `retryAfterS` (with `busy`, `too_many_pending`): when a retry may succeed."""

    def to_message(self) -> "ErrorMessage":
        return error(self.code, self.message, self.retry_after_s)


# ---- client -> server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """Open a session: the browser's SDP offer (ICE candidates gathered in it, or trickled after)."""

    type: ClassVar[str] = "offer"
    sdp: str
    mode: Literal["mic", "push"] = "mic"
    prompt: str = ""
    portrait: str | None = None
    """Base64 JPG/PNG bytes; the backend's default portrait when absent."""
    sample_rate: int = 16_000
    """Rate of binary PCM frames pushed later on this connection."""


@dataclass(frozen=True)
class Ice:
    """A trickled ICE candidate (`candidate` line of RTCIceCandidate); null ends the candidates."""

    type: ClassVar[str] = "ice"
    candidate: str | None = None
    sdpMid: str | None = None
    sdpMLineIndex: int | None = None


@dataclass(frozen=True)
class Push:
    """Audio for push mode as base64 s16le mono; `session` addresses a session of another connection."""

    type: ClassVar[str] = "push"
    audio: str
    sample_rate: int | None = None
    """Rate of `audio`; 16000 when absent (the offer's `sample_rate` applies to binary frames only)."""
    session: str | None = None
    """A session of another connection (with `token`); this connection then gets its `started` / `finished` too."""
    token: str | None = None
    """The session's capability token (from its `answer`), needed to address another connection's session."""


@dataclass(frozen=True)
class PushEnd:
    """The utterance being pushed is complete: `finished` follows once it has played."""

    type: ClassVar[str] = "push_end"
    session: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Interrupt:
    """Drop all queued audio; the avatar is back to idle at the next block."""

    type: ClassVar[str] = "interrupt"
    session: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Switch:
    """New portrait and/or prompt, applied at the next block boundary."""

    type: ClassVar[str] = "switch"
    prompt: str | None = None
    portrait: str | None = None
    session: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Stop:
    """End this connection's session, or (with `session` and its `token`) another connection's."""

    type: ClassVar[str] = "stop"
    session: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Ping:
    type: ClassVar[str] = "ping"


ClientMessage = Offer | Ice | Push | PushEnd | Interrupt | Switch | Stop | Ping
CLIENT_MESSAGES: dict[str, type] = {cls.type: cls for cls in (Offer, Ice, Push, PushEnd, Interrupt, Switch, Stop, Ping)}


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse_message(text: str | bytes) -> ClientMessage:
    """One text frame -> its message dataclass, or ProtocolError(bad_json | unknown_type | bad_message)."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"invalid JSON: {exc}") from None
    except RecursionError:  # not a ValueError: deep nesting ("[" * 1000) exhausts the parser's stack
        raise ProtocolError("bad_json", "invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", "a message must be a JSON object")
    kind = data.get("type")
    cls = CLIENT_MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(CLIENT_MESSAGES)
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of {known}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING:
                raise ProtocolError("bad_message", f"{kind}: missing field {f.name!r}")
            continue
        if not _matches(data[f.name], hints[f.name]):
            raise ProtocolError("bad_message", f"{kind}: field {f.name!r} has the wrong type or value")
        kwargs[f.name] = data[f.name]
    return cls(**kwargs)


def decode_base64(text: str, what: str, bad_code: str, limit: int, too_large_code: str) -> bytes:
    """Strict base64 (a data: URL prefix is allowed), refusing anything over `limit` decoded bytes."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if len(text) * 3 // 4 > limit + 3:
        raise ProtocolError(too_large_code, f"{what} is over {limit} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(bad_code, f"{what} is not valid base64") from None
    if len(data) > limit:
        raise ProtocolError(too_large_code, f"{what} is over {limit} bytes")
    return data


def check_rate(rate: int) -> int:
    if rate not in PUSH_RATES:
        raise ProtocolError("bad_audio", f"sample_rate {rate} is not one of {PUSH_RATES}")
    return rate


# ---- server -> client ---------------------------------------------------------------------------
# Every message the server sends is built by one of the constructors below, so what goes on the wire
# is what these types say; tests/test_protocol_matches_docs.py checks them against docs/protocol.md.


class RealtimePlanFields(TypedDict):
    """Whether one session keeps real time on a GPU set, from the start-up measurement."""

    keeps: bool
    steps: int
    blockMs: int
    advice: str


class ModelFields(TypedDict):
    """What the server runs, as `config.model` (built by `server.model.ModelInfo.to_message`)."""

    weights: str
    """`checkpoint`, `random:tiny`, `random:14b`, `none` or `given`."""
    engine: str
    fp8: bool
    attention: str
    sampleSteps: int
    device: str
    devices: list[str]
    """The device of each GPU set."""
    notes: list[str]
    """Settings asked for but not applied."""
    realtime: RealtimePlanFields | None
    """None when not measured (no warm-up)."""


class ConfigMessage(TypedDict):
    """Sent once when the WebSocket opens: what the client needs to build its peer connection."""

    type: Literal["config"]
    iceServers: list[dict[str, Any]]
    iceTransportPolicy: str
    """`all` or `relay`."""
    turnError: NotRequired[str]
    """Only when the server's start-up TURN check failed."""
    backend: str
    model: ModelFields
    fps: int
    framesPerBlock: int
    size: str
    maxLagMs: int
    """The lag bound without step time: minimum lag plus max_lag_blocks blocks."""
    maxMessageBytes: int
    maxUploadBytes: int
    version: str


def config(
    *,
    ice_servers: list[dict[str, Any]],
    ice_transport_policy: str,
    turn_error: str,
    backend: str,
    model: ModelFields,
    fps: int,
    frames_per_block: int,
    size: str,
    max_lag_ms: int,
    max_message_bytes: int,
    max_upload_bytes: int,
    version: str,
) -> ConfigMessage:
    """`turn_error`: empty when the TURN check passed (or did not run); the field is left out then."""
    message = ConfigMessage(
        type="config", iceServers=ice_servers, iceTransportPolicy=ice_transport_policy,
        backend=backend, model=model, fps=fps, framesPerBlock=frames_per_block, size=size,
        maxLagMs=max_lag_ms, maxMessageBytes=max_message_bytes, maxUploadBytes=max_upload_bytes,
        version=version,
    )  # fmt: skip
    if turn_error:
        message["turnError"] = turn_error
    return message


class AnswerMessage(TypedDict):
    type: Literal["answer"]
    sdp: str
    session: str
    token: str
    """The session's capability token: another connection (an app's back end) that sends it along with
    `session` may push, push_end, interrupt, switch and stop; without it, `forbidden`."""
    mode: Literal["mic", "push"]
    videoCodec: str
    """`VP8` or `H264`."""


def answer(sdp: str, session: str, token: str, mode: Literal["mic", "push"], video_codec: str) -> AnswerMessage:
    return AnswerMessage(type="answer", sdp=sdp, session=session, token=token, mode=mode, videoCodec=video_codec)


class PlaybackMessage(TypedDict):
    """`started` when the first block of a pushed utterance goes out, `finished` after its last one.

    Sent to the session's own connection and to every other open connection that pushed into it
    (push / push_end / interrupt with its `session` id)."""

    type: Literal["started", "finished"]
    session: str
    utterance: int
    position: float
    """Seconds of the utterance played so far (its full length when it finished uninterrupted)."""
    interrupted: bool


def started(session: str, utterance: int) -> PlaybackMessage:
    return PlaybackMessage(type="started", session=session, utterance=utterance, position=0.0, interrupted=False)


def finished(session: str, utterance: int, position: float, interrupted: bool) -> PlaybackMessage:
    return PlaybackMessage(
        type="finished", session=session, utterance=utterance, position=position, interrupted=interrupted
    )


class SpeechMessage(TypedDict):
    """What the VAD heard, in seconds of the session's input stream."""

    type: Literal["speech_start", "speech_end"]
    at: float
    utterance: NotRequired[int]
    """Push mode: the pushed utterance the boundary falls in."""
    position: NotRequired[float]
    """Push mode: seconds into that utterance."""


def speech(
    kind: Literal["speech_start", "speech_end"], at: float, utterance: int | None = None, position: float = 0.0
) -> SpeechMessage:
    """`utterance`: None when the boundary is in no pushed utterance (mic mode); `position` goes with it."""
    message = SpeechMessage(type=kind, at=at)
    if utterance is not None:
        message["utterance"], message["position"] = utterance, position
    return message


class SwitchedMessage(TypedDict):
    type: Literal["switched"]
    block: int
    """The first block generated with the new look."""


def switched(block: int) -> SwitchedMessage:
    return SwitchedMessage(type="switched", block=block)


class StatsMessage(TypedDict):
    """Once a second, for the page's stats line; the only message a full outbox may drop."""

    type: Literal["stats"]
    fps: float
    lagMs: int | None
    onsetLagMs: int | None
    queueDepth: int
    blocks: int
    droppedFrames: int
    underrunFrames: int
    trimmedFrames: int
    droppedWindows: int
    droppedLateBlocks: int
    backend: str
    sampleSteps: int
    """Denoising steps in use now (fewer than configured while degraded)."""
    maxLagMs: int
    realtime: RealtimePlanFields | None


def stats(
    *,
    fps: float,
    lag_ms: int | None,
    onset_lag_ms: int | None,
    queue_depth: int,
    blocks: int,
    dropped_frames: int,
    underrun_frames: int,
    trimmed_frames: int,
    dropped_windows: int,
    dropped_late_blocks: int,
    backend: str,
    sample_steps: int,
    max_lag_ms: int,
    realtime: RealtimePlanFields | None,
) -> StatsMessage:
    return StatsMessage(
        type="stats",
        fps=fps,
        lagMs=lag_ms,
        onsetLagMs=onset_lag_ms,
        queueDepth=queue_depth,
        blocks=blocks,
        droppedFrames=dropped_frames,
        underrunFrames=underrun_frames,
        trimmedFrames=trimmed_frames,
        droppedWindows=dropped_windows,
        droppedLateBlocks=dropped_late_blocks,
        backend=backend,
        sampleSteps=sample_steps,
        maxLagMs=max_lag_ms,
        realtime=realtime,
    )


class ClosedMessage(TypedDict):
    type: Literal["closed"]
    session: str
    reason: str


def closed(session: str, reason: str) -> ClosedMessage:
    return ClosedMessage(type="closed", session=session, reason=reason)


class PongMessage(TypedDict):
    type: Literal["pong"]


def pong() -> PongMessage:
    return PongMessage(type="pong")


class ErrorMessage(TypedDict):
    type: Literal["error"]
    code: str
    """One of ERROR_CODES."""
    message: str
    retryAfterS: NotRequired[float]
    """With `busy` and `too_many_pending`: seconds after which a retry may succeed."""


def error(code: str, message: str, retry_after_s: float | None = None) -> ErrorMessage:
    assert code in ERROR_CODES, code
    out = ErrorMessage(type="error", code=code, message=message)
    if retry_after_s is not None:
        out["retryAfterS"] = retry_after_s
    return out


ServerMessage = (
    ConfigMessage
    | AnswerMessage
    | PlaybackMessage
    | SpeechMessage
    | SwitchedMessage
    | StatsMessage
    | ClosedMessage
    | PongMessage
    | ErrorMessage
)
SERVER_MESSAGES: dict[str, type] = {
    kind: cls for cls in typing.get_args(ServerMessage) for kind in typing.get_args(typing.get_type_hints(cls)["type"])
}
"""Each outgoing `type` -> the TypedDict of its fields."""


def dumps(message: ServerMessage) -> str:
    return json.dumps(message, separators=(",", ":"))
