"""Shared fixtures: paths to the test media, and servers on free loopback ports.

`start_server` runs the app inside the test's event loop (tests can read its registry and metrics
and hand it a test-double generator); `server_process` runs `liveavatar serve` as a real subprocess,
the way users start it. Both stop what they started when the test ends.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from processes import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection imported (torch, aiortc, the packages) out of the garbage collector, as
    `liveavatar serve` does after start-up: otherwise a full collection walks it on the event loop of
    an in-process server test for a quarter of a second, and the timing checks see frames skipped."""
    gc.collect()
    gc.freeze()


@pytest.fixture
def assets() -> Path:
    """Folder of the test media (speech_en_48k.wav, silence_48k_3s.wav, ...)."""
    return ASSETS


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Until `url` answers 200 (a server starting up), or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout} s")
        time.sleep(0.1)


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """`app = await start_server(generator=None, **config_fields)`: an in-process server on a free port.

    Without a generator the configured backend is built (preview by default); `app.url` is its page,
    `app.url + "ws"` its signalling socket.
    """
    from server.app import App
    from server.config import ServerConfig

    apps: list[App] = []

    async def start(generator: Any = None, **fields: Any) -> App:
        # cpu_capacity 0: in this process the test's own peers (decoding video) would count as the
        # sessions' cost; tests of the CPU admission set it
        config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "cpu_capacity": 0, **fields}).validate()
        app = App(config, generator=generator)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[str]

    def output(self) -> str:
        """Everything the server printed so far (call after it stopped)."""
        out, _ = self.process.communicate(timeout=10)
        return out


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    """`server_process("--backend", "preview", env={...})`: `liveavatar serve` in a subprocess on a free port."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> ServerProcess:
        port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_http(url + "healthz", timeout)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{proc.communicate()[0]}") from None
        return ServerProcess(url, proc)

    yield start
    for proc in started:
        stop_process(proc, timeout=10)


@pytest.fixture(scope="session")
def tiny_liveavatar() -> Any:
    """The `liveavatar` backend with tiny random weights on CPU, built once for the whole run
    (5 motion frames instead of 73 keep each session's VAE work small)."""
    from liveavatar.backends import create_generator

    return create_generator("liveavatar", random_weights="tiny", device="cpu", motion_frames=5)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test: tiny models gain nothing from more, and CI's two cores are
    shared with the server's event loop and encoders."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
