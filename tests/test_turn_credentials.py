"""TURN REST credentials and the browser's ICE server list: pure functions, no network."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from server.turn import TurnProbeResult, ice_servers, rest_credential, rtc_configuration, turn_error_summary

SECRET = "north-wind-secret"


def test_rest_credential_matches_known_hmac_sha1_vector() -> None:
    # Computed independently: printf '1700003600:alice' | openssl dgst -sha1 -hmac north-wind-secret -binary | base64
    cred = rest_credential(SECRET, user="alice", ttl_s=3600, now=1_700_000_000)
    assert cred.username == "1700003600:alice"
    assert cred.expires_at == 1_700_003_600
    assert cred.credential == "Ev9WJy6IiNjALah9jF2ImB4FP0Y="


def test_rest_credential_is_hmac_of_username_with_the_secret() -> None:
    cred = rest_credential(SECRET, ttl_s=60, now=100.7)
    expected = base64.b64encode(hmac.new(SECRET.encode(), cred.username.encode(), hashlib.sha1).digest()).decode()
    assert cred.username == "160:liveavatar"
    assert cred.credential == expected


@pytest.mark.parametrize(("secret", "ttl"), [("", 60), (SECRET, 0), (SECRET, -5)])
def test_rest_credential_refuses_empty_secret_and_non_positive_ttl(secret: str, ttl: int) -> None:
    with pytest.raises(ValueError):
        rest_credential(secret, ttl_s=ttl)


def test_ice_server_list_carries_short_lived_credentials_and_never_the_secret() -> None:
    servers = ice_servers(
        stun_urls=["stun:turn.example.org:3478"],
        turn_urls=["turn:turn.example.org:3478", "turns:turn.example.org:5349?transport=tcp"],
        turn_secret=SECRET,
        ttl_s=600,
        now=1_000,
    )
    assert servers[0] == {"urls": ["stun:turn.example.org:3478"]}
    turn = servers[1]
    assert turn["urls"] == ["turn:turn.example.org:3478", "turns:turn.example.org:5349?transport=tcp"]
    assert turn["username"] == "1600:liveavatar"
    assert turn["credential"] == rest_credential(SECRET, ttl_s=600, now=1_000).credential
    assert SECRET not in json.dumps(servers)


def test_each_ice_server_list_gets_a_fresh_expiry() -> None:
    first = ice_servers(turn_urls=["turn:127.0.0.1:3478"], turn_secret=SECRET, ttl_s=60, now=0)
    later = ice_servers(turn_urls=["turn:127.0.0.1:3478"], turn_secret=SECRET, ttl_s=60, now=30)
    assert first[0]["username"] != later[0]["username"]


def test_ice_server_list_is_empty_without_stun_or_turn() -> None:
    assert ice_servers() == []


@pytest.mark.parametrize(
    ("stun", "turn", "secret", "message"),
    [
        ([], ["turn:h:3478"], "", "turn_secret is empty"),
        ([], [], SECRET, "no turn_urls"),
        (["turn:h:3478"], [], "", "not a STUN URL"),
        ([], ["stun:h:3478"], SECRET, "not a TURN URL"),
    ],
)
def test_ice_server_list_rejects_misconfiguration(stun: list[str], turn: list[str], secret: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ice_servers(stun_urls=stun, turn_urls=turn, turn_secret=secret)


def test_rtc_configuration_can_force_relay_only() -> None:
    servers = ice_servers(turn_urls=["turn:127.0.0.1:3478"], turn_secret=SECRET)
    relay = rtc_configuration(servers, relay_only=True)
    assert relay.iceTransportPolicy.value == "relay"
    assert relay.iceServers[0].username == servers[0]["username"]
    assert rtc_configuration(servers).iceTransportPolicy.value == "all"


def test_turn_error_summary_joins_only_failures() -> None:
    results = [
        TurnProbeResult("turn:a:3478", True, ("127.0.0.1", 50000)),
        TurnProbeResult("turn:b:3478", False, error="b refused"),
        TurnProbeResult("turn:c:3478", False, error="c timed out"),
    ]
    assert turn_error_summary(results) == "b refused; c timed out"
    assert turn_error_summary(results[:1]) == ""
