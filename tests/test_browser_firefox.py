"""The real page in Debian's headless Firefox ESR, driven through Marionette (`marionette-driver`).

Firefox keeps its default ICE settings: its offer names its host candidates only by `<uuid>.local`
mDNS names, which the server cannot resolve, so the connection rests on peer-reflexive pairs (see
server/ice.py). Only the fake media device and autoplay are set: the fake device is a tone, which the
server plays back in mic mode. Firefox has no H.264 here (it downloads OpenH264 at run time), so it
gets VP8.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from browser_probe import COLLECT, INSTALL, media_fps, offer_candidates
from processes import free_port

FIREFOX = "/usr/bin/firefox-esr"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(FIREFOX), reason=f"{FIREFOX} is absent (bash docker/install.sh --dev)"),
]

PREFS: dict[str, Any] = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "browser.shell.checkDefaultBrowser": False,
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
}


@contextmanager
def firefox(profile: Path) -> Iterator[Any]:
    """A headless Firefox with a fresh profile and a Marionette session on it."""
    from marionette_driver.marionette import Marionette

    port = free_port()
    profile.mkdir(parents=True)
    prefs = {**PREFS, "marionette.port": port}
    (profile / "user.js").write_text(
        "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())
    )
    proc = subprocess.Popen(
        [FIREFOX, "--headless", "--marionette", "--no-remote", "--profile", str(profile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = Marionette(host="127.0.0.1", port=port)
    try:
        client.start_session(timeout=60)
        yield client
    finally:
        with contextlib.suppress(Exception):  # the browser may already be gone; it is killed below either way
            client.delete_session()
        os.killpg(proc.pid, signal.SIGTERM)  # Firefox and its content processes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def page(client: Any, script: str) -> Any:
    """Evaluate `script` in the page's own scope (where its `pc` lives), outside Marionette's sandbox."""
    return client.execute_script("return window.wrappedJSObject.eval(arguments[0])", script_args=[script])


def wait(client: Any, condition: str, timeout: float) -> float:
    """Seconds until `condition` holds in the page."""
    t0 = time.monotonic()
    while not page(client, condition):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{condition!r} not true in {timeout} s; events {page(client, EVENTS)}")
        time.sleep(0.05)
    return time.monotonic() - t0


EVENTS = "JSON.stringify(window.liveavatar.events.map((e) => e.type))"


def run_session(client: Any, url: str, mode: str, then: Callable[[], None]) -> dict[str, Any]:
    """Open the page, start a session in `mode`, record while `then()` runs; the page's figures."""
    from marionette_driver.by import By

    client.navigate(url)
    page(client, f"document.getElementById('mode').value = '{mode}'")
    client.find_element(By.ID, "start").click()
    wait(client, "window.liveavatar.stats.connected", 20)
    wait(client, "window.liveavatar.stats.framesShown > 10", 10)
    page(client, INSTALL)
    then()
    page(client, "window.__probeOut = null; " + COLLECT)
    wait(client, "window.__probeOut", 5)
    out = json.loads(page(client, "window.__probeOut"))
    out.update(
        stats=json.loads(page(client, "JSON.stringify(window.liveavatar.stats)")),
        events=json.loads(page(client, "JSON.stringify(window.liveavatar.events)")),
    )
    client.find_element(By.ID, "stop").click()
    return out


def test_firefox_with_default_ice_settings_streams_in_mic_and_push_mode(server_process, tmp_path) -> None:
    server = server_process("--backend", "preview")
    with firefox(tmp_path / "profile") as client:
        mic = run_session(client, server.url, "mic", lambda: time.sleep(3))
        push = run_session(
            client,
            server.url,
            "push",
            lambda: wait(client, "window.liveavatar.events.some((e) => e.type === 'finished')", 25),
        )
    for mode, run in (("mic", mic), ("push", push)):
        fps = media_fps(run["frames"])
        print(
            f"firefox {mode}: connected {run['stats']['connectedMs']} ms, "
            f"first frame {run['stats']['firstFrameMs']} ms, "
            f"{fps:.1f} fps over media time, codec {run['stats']['codec']}, audio {run['audio']['samples']} samples"
        )
        addresses = offer_candidates(run["offer"])
        assert addresses and all(a.endswith(".local") for a in addresses), addresses  # default ICE: mDNS only
        assert fps >= 24
        assert run["audio"]["samples"] > 48_000 and run["audio"]["energy"] > 0
        assert run["stats"]["codec"] == "VP8" and not run["stats"]["errors"]
    finished = next(e for e in push["events"] if e["type"] == "finished")
    assert finished["interrupted"] is False
