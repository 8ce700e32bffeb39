"""docs/protocol.md and server/protocol.py describe the same messages, field for field, and the server
sends no message that its constructors did not build: a field added on one side only fails here."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from server import protocol as P

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text()


def table(heading: str) -> list[tuple[list[str], list[str], str]]:
    """The rows of the table under `## heading`: (message types, field names, the fields cell)."""
    section = doc_section(heading)
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("type", "") or set(cells[0]) <= {"-"}:
            continue
        fields = re.findall(r"`([A-Za-z_]\w*)`", outside_parens(cells[1]))  # not values such as `"mic"`
        rows.append((re.findall(r"`([^`]+)`", cells[0]), fields, cells[1]))
    return rows


def doc_section(heading: str) -> str:
    return DOC.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def outside_parens(text: str) -> str:
    """`text` without its (possibly nested) parenthesised remarks: what is left names the fields."""
    out, depth = [], 0
    for ch in text:
        depth += ch == "("
        if depth == 0:
            out.append(ch)
        depth -= ch == ")" and depth > 0
    return "".join(out)


SERVER_ROWS = table("Server → client")
CLIENT_ROWS = table("Client → server")


def documented(rows) -> dict[str, tuple[set[str], str]]:
    return {kind: (set(fields), cell) for kinds, fields, cell in rows for kind in kinds}


def test_the_doc_tables_were_found() -> None:
    assert len(SERVER_ROWS) >= 9 and len(CLIENT_ROWS) >= 8, (SERVER_ROWS, CLIENT_ROWS)


def test_every_server_message_type_is_documented_and_every_documented_one_exists() -> None:
    assert set(documented(SERVER_ROWS)) == set(P.SERVER_MESSAGES)


@pytest.mark.parametrize("kind", sorted(P.SERVER_MESSAGES))
def test_server_message_fields_match_the_doc(kind: str) -> None:
    fields, _ = documented(SERVER_ROWS)[kind]
    hints = typing.get_type_hints(P.SERVER_MESSAGES[kind])
    assert fields == set(hints) - {"type"}, f"{kind}: documented {sorted(fields)}, sent {sorted(hints)}"
    section = doc_section("Server → client")
    for name, hint in hints.items():  # nested objects (config.model, the realtime plan): named in the section
        for nested in _typed_dicts(hint):
            missing = [key for key in typing.get_type_hints(nested) if not re.search(rf"\b{key}\b", section)]
            assert not missing, f"{kind}.{name}: {missing} not documented"


def _typed_dicts(hint) -> list[type]:
    if typing.is_typeddict(hint):
        return [hint, *(t for h in typing.get_type_hints(hint).values() for t in _typed_dicts(h))]
    return [t for arg in typing.get_args(hint) for t in _typed_dicts(arg)]


def test_client_message_fields_match_the_doc() -> None:
    docs = documented(CLIENT_ROWS)
    assert set(docs) == set(P.CLIENT_MESSAGES)
    for kind, cls in P.CLIENT_MESSAGES.items():
        assert docs[kind][0] == {f.name for f in dataclasses.fields(cls)}, kind


REALTIME = P.RealtimePlanFields(keeps=True, steps=4, blockMs=290, advice="")
MODEL = P.ModelFields(
    weights="none",
    engine="eager",
    fp8=False,
    attention="sdpa",
    sampleSteps=4,
    device="cpu",
    devices=["cpu"],
    notes=[],
    realtime=REALTIME,
)


def _config(ice_servers: list[dict[str, typing.Any]], policy: str, turn_error: str) -> P.ConfigMessage:
    return P.config(
        ice_servers=ice_servers,
        ice_transport_policy=policy,
        turn_error=turn_error,
        backend="preview",
        model=MODEL,
        fps=25,
        frames_per_block=12,
        size="512*512",
        max_lag_ms=1440,
        max_message_bytes=1,
        max_upload_bytes=2,
        version="0",
    )


EXAMPLES: list[P.ServerMessage] = [
    _config([{"urls": "stun:x"}], "all", ""),
    _config([], "relay", "no relay"),  # turnError only when the TURN check failed
    P.answer("v=0", "s1", "tok", "push", "VP8"),
    P.started("s1", 1),
    P.finished("s1", 1, 2.5, False),
    P.speech("speech_start", 1.0),
    P.speech("speech_end", 2.0, 1, 0.5),
    P.switched(7),
    P.stats(
        fps=25.0,
        lag_ms=None,
        onset_lag_ms=600,
        queue_depth=1,
        blocks=9,
        dropped_frames=0,
        underrun_frames=0,
        trimmed_frames=0,
        dropped_windows=0,
        dropped_late_blocks=0,
        backend="preview",
        sample_steps=0,
        max_lag_ms=1440,
        realtime=None,
    ),
    P.closed("s1", "stopped by the client"),
    P.pong(),
    P.error("bad_json", "invalid JSON"),
    P.error("busy", "server busy", retry_after_s=30),
    P.ProtocolError("too_many_pending", "wait", retry_after_s=10.0).to_message(),
]


def test_examples_cover_every_type_and_every_optional_field() -> None:
    assert {m["type"] for m in EXAMPLES} == set(P.SERVER_MESSAGES)
    for cls in set(P.SERVER_MESSAGES.values()):
        sent = {key for m in EXAMPLES if P.SERVER_MESSAGES[m["type"]] is cls for key in m}
        assert sent == set(typing.get_type_hints(cls)), cls.__name__


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m["type"])
def test_each_constructor_builds_its_type(message: P.ServerMessage) -> None:
    cls = P.SERVER_MESSAGES[message["type"]]
    assert cls.__required_keys__ <= set(message) <= cls.__required_keys__ | cls.__optional_keys__
    assert json.loads(P.dumps(message)) == message


def test_the_server_sends_no_message_its_constructors_did_not_build() -> None:
    literal = re.compile(r"""["']type["']\s*:|\bdict\(\s*type\s*=""")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "server").glob("*.py"))
        if path.name != "protocol.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert not offenders, "build outgoing messages with server/protocol.py's constructors:\n" + "\n".join(offenders)
