"""Settings: defaults < TOML file < LIVEAVATAR_* environment < command-line flags; secrets stay masked."""

from __future__ import annotations

import argparse
import json

import pytest

from server import serve_cmd
from server.config import ConfigError, ServerConfig, ice_servers, load_config, parse_ice_server


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_each_layer_overrides_the_one_below(tmp_path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text('port = 9000\nmax-sessions = 3\nvad_mode = 1\nice_servers = ["stun:a:1"]\n')
    env = {"LIVEAVATAR_MAX_SESSIONS": "5", "LIVEAVATAR_VAD_MODE": "3", "LIVEAVATAR_ICE_SERVERS": "stun:b:2,stun:c:3"}
    config = load_config(toml, env=env, overrides={"vad_mode": 0, "port": None})
    assert config.port == 9000  # file
    assert config.max_sessions == 5  # env over file
    assert config.vad_mode == 0  # flag over env
    assert config.ice_servers == ["stun:b:2", "stun:c:3"]
    assert config.host == ServerConfig().host  # default


def test_serve_flags_reach_the_config(monkeypatch) -> None:
    monkeypatch.setenv("LIVEAVATAR_PORT", "7000")
    args = cli("--port", "7100", "--ice-server", "stun:x:1", "--ice-server", "turn:u:p@y:2", "--size", "256*256")
    config = serve_cmd.config_from_args(args)
    assert config.port == 7100 and config.size == "256*256"
    assert config.ice_servers == ["stun:x:1", "turn:u:p@y:2"]
    assert serve_cmd.config_from_args(cli()).port == 7000


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("colour = 1\n", {}, "unknown setting"),
        ("port = [1]\n", {}, "port"),
        ("", {"LIVEAVATAR_PORT": "eighty"}, "LIVEAVATAR_PORT"),
        ("", {"LIVEAVATAR_MAX_SESSIONS": "0"}, "max_sessions"),
        ("", {"LIVEAVATAR_SIZE": "500x500"}, "multiple of 16"),
        ("", {"LIVEAVATAR_ICE_SERVERS": "turn:host:3478"}, "user:pass"),
        ("", {"LIVEAVATAR_TURN_URL": "turn:host:3478"}, "turn"),
        ("", {"LIVEAVATAR_MAX_MESSAGE_BYTES": "5000"}, "base64 portrait"),
        ('engine = "tensorrt"\n', {}, "does not run TensorRT.*--engine compile"),
        ("", {"LIVEAVATAR_ENGINE": "turbo"}, "engine must be one of eager, compile"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(tmp_path, toml, env, message) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env=env)


def test_print_config_masks_secrets(capsys) -> None:
    args = cli(
        "--print-config", "--turn-url", "turn:t:3478", "--turn-secret", "hunter2", "--ice-server", "turn:me:pw@h:1"
    )
    assert serve_cmd.run(args) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)
    assert "hunter2" not in out and ":pw@" not in out
    assert shown["turn_secret"] == "***" and shown["ice_servers"] == ["turn:me:***@h:1"]


def test_ice_servers_for_a_session_use_fresh_turn_rest_credentials() -> None:
    config = ServerConfig(
        ice_servers=["stun:s:1", "turn:u:p@t:2?transport=tcp"], turn_url="turn:r:3478", turn_secret="k", turn_ttl=60
    ).validate()
    servers = ice_servers(config, now=1_000_000)
    assert servers[0] == {"urls": "stun:s:1"}
    assert servers[1] == {"urls": "turn:t:2?transport=tcp", "username": "u", "credential": "p"}
    assert servers[2]["urls"] == ["turn:r:3478"] and servers[2]["username"] == "1000060:liveavatar"
    assert parse_ice_server("stuns:h:5349") == {"urls": "stuns:h:5349"}
