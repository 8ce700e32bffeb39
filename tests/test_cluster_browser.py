"""The real page in Debian's headless Chromium against a cluster front door (server/cluster/): a local Ray
cluster of a head and two worker nodes on loopback, one preview replica of one session slot on each.

The page plays the avatar from its microphone through the front door as it does from one host; when the
replica running its session dies, it gets `replica_lost` and opens a new session by itself, once: the
second loss leaves it stopped. Frame rate is judged over media time (RTP timestamps).
"""

from __future__ import annotations

import json
import os

import pytest
from browser_probe import COLLECT, INSTALL, media_fps
from cluster_helpers import REPLICA, eventually, module_cluster, start_front_door
from test_browser_e2e import CHROMIUM, measure_playback_fps, open_browser, pcm_wav

pytest.importorskip("ray.serve")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]

APP = {"cluster_app": "browser", "replicas_min": 2, "replicas_max": 2, "sessions_per_replica": 1, **REPLICA}


cluster = pytest.fixture(scope="module", name="cluster")(module_cluster)


@pytest.fixture
async def front_door(cluster):
    door = await start_front_door(cluster.address, **APP)
    yield door
    await door.stop(end_sessions=True)


async def test_page_plays_the_avatar_from_the_mic_through_the_cluster_front_door(front_door, assets, tmp_path) -> None:
    from playwright.async_api import async_playwright

    wav = pcm_wav(assets / "speech_en_48k.wav", tmp_path / "mic.wav")
    async with async_playwright() as p:
        context = await open_browser(p, wav, tmp_path / "profile")
        page = context.pages[0] if context.pages else await context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        await page.goto(front_door.url)
        await page.click("#start")
        await page.wait_for_function("window.liveavatar.stats.framesShown > 25", timeout=20_000)
        first_frame_ms = await page.evaluate("window.liveavatar.stats.firstFrameMs")
        await page.evaluate(INSTALL)
        playback_fps = await measure_playback_fps(page)
        probe = json.loads(await page.evaluate(COLLECT))
        await page.wait_for_function("window.liveavatar.events.some((e) => e.type === 'speech_start')", timeout=15_000)
        stats = await page.evaluate("window.liveavatar.stats")
        badge = await page.inner_text("#backend")
        await page.click("#stop")
        await context.close()
    fps = media_fps(probe["frames"])
    print(
        f"browser via the cluster: first frame {first_frame_ms} ms, {fps:.1f} fps over media time, "
        f"playback {playback_fps:.1f} fps, codec {stats['codec']}"
    )
    assert not problems, problems
    assert first_frame_ms is not None and first_frame_ms < 3000
    assert fps >= 24 and playback_fps >= 20
    assert probe["audio"]["samples"] > 48_000 and probe["audio"]["energy"] > 0
    assert stats["connected"] and stats["backend"] == "preview" and "preview" in badge
    assert not stats["errors"]


async def test_page_opens_a_new_session_once_when_its_replica_is_lost(front_door, assets, tmp_path) -> None:
    import ray
    from playwright.async_api import async_playwright

    def kill_replica_of(answer: dict) -> None:
        placement = front_door.sessions[answer["session"]].placement
        ray.kill(ray.get_actor(placement["actor"], namespace="serve"))

    answers = "window.liveavatar.events.filter((e) => e.type === 'answer')"
    wav = pcm_wav(assets / "silence_48k_3s.wav", tmp_path / "mic.wav")
    async with async_playwright() as p:
        context = await open_browser(p, wav, tmp_path / "profile")
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto(front_door.url)
        await page.select_option("#mode", "push")
        await page.click("#start")
        await page.wait_for_function("window.liveavatar.stats.framesShown > 10", timeout=20_000)
        first = (await page.evaluate(answers))[0]
        kill_replica_of(first)
        await page.wait_for_function(f"{answers}.length === 2", timeout=20_000)
        await page.wait_for_function("window.liveavatar.stats.framesShown > 10", timeout=20_000)
        second = (await page.evaluate(answers))[1]
        shown_again = await page.evaluate("window.liveavatar.stats.framesShown")
        kill_replica_of(second)  # a second loss: the page does not try again by itself
        await page.wait_for_function(
            "document.getElementById('stats').textContent.includes('replica lost')", timeout=20_000
        )
        await eventually(lambda: page.evaluate("!document.getElementById('start').disabled"), 5, "Start enabled")
        status = await page.inner_text("#stats")
        count = len(await page.evaluate(answers))
        errors = await page.evaluate("window.liveavatar.stats.errors")
        await context.close()
    assert second["session"] != first["session"]
    assert front_door.sessions == {}, "both sessions ended at the front door"
    assert shown_again > 10, "the new session plays"
    assert count == 2, "one automatic reconnect, not two"
    assert "press Start" in status
    # A message the page had in flight for a session as it was lost may come back `unknown_session`.
    assert errors[:2] == ["replica_lost", "replica_lost"] and set(errors[2:]) <= {"unknown_session"}, errors
