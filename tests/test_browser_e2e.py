"""The real page in Debian's headless Chromium, with a WAV file as its microphone.

The page reports what the browser itself measured (requestVideoFrameCallback, getStats) in
`window.liveavatar.stats`; the test reads those figures and cross-checks the frame rate with
`getVideoPlaybackQuality()`.
"""

from __future__ import annotations

import asyncio
import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest
from browser_probe import COLLECT, INSTALL, media_fps

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


def pcm_wav(source: Path, target: Path) -> Path:
    """Chromium's fake capture wants plain 16-bit PCM WAV; the asset is WAVE_FORMAT_EXTENSIBLE."""
    from liveavatar.media_io import decode_audio

    audio = decode_audio(source, rate=48_000).samples
    with wave.open(str(target), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48_000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return target


async def open_browser(playwright, wav: Path, profile: Path):
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    return await playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=args
    )


async def measure_playback_fps(page, seconds: float = 2.0) -> float:
    return await page.evaluate(
        """async (ms) => {
            const v = document.getElementById("video");
            const a = v.getVideoPlaybackQuality().totalVideoFrames;
            const t = performance.now();
            await new Promise((r) => setTimeout(r, ms));
            return (v.getVideoPlaybackQuality().totalVideoFrames - a) / ((performance.now() - t) / 1000);
        }""",
        int(seconds * 1000),
    )


async def test_page_connects_with_the_mic_and_plays_the_avatar_smoothly(start_server, assets, tmp_path) -> None:
    from playwright.async_api import async_playwright

    app = await start_server()
    wav = pcm_wav(assets / "speech_en_48k.wav", tmp_path / "mic.wav")
    async with async_playwright() as p:
        context = await open_browser(p, wav, tmp_path / "profile")
        page = context.pages[0] if context.pages else await context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        await page.goto(app.url)
        await page.click("#start")
        await page.wait_for_function("window.liveavatar.stats.framesShown > 25", timeout=20_000)
        first_frame_ms = await page.evaluate("window.liveavatar.stats.firstFrameMs")
        await page.evaluate(INSTALL)
        playback_fps = await measure_playback_fps(page)
        probe = json.loads(await page.evaluate(COLLECT))
        await page.wait_for_function("window.liveavatar.stats.lagMs !== null", timeout=10_000)
        stats = await page.evaluate("window.liveavatar.stats")
        line = await page.inner_text("#stats")
        badge = await page.inner_text("#backend")
        events = await page.evaluate("window.liveavatar.events.map((e) => e.type)")
        await page.click("#stop")
        await context.close()
    fps = media_fps(probe["frames"])
    print(
        f"browser: connected {stats['connectedMs']} ms, first frame {first_frame_ms} ms, "
        f"{fps:.1f} fps over media time, playback {playback_fps:.1f} fps, rVFC {stats['fps']:.1f} fps, "
        f"lag {stats['lagMs']} ms + jitter {stats['jitterMs']} ms, {stats['kbps']} kbps, codec {stats['codec']}"
    )
    assert not problems, problems
    assert first_frame_ms is not None and first_frame_ms < 3000
    assert fps >= 24
    assert playback_fps >= 20
    assert stats["fps"] >= 20
    assert probe["audio"]["samples"] > 48_000 and probe["audio"]["energy"] > 0
    assert stats["connected"] and stats["backend"] == "preview" and "preview" in badge
    assert "preview" in line and "fps" in line
    assert "speech_start" in events  # the server heard the fake mic's speech
    assert not stats["errors"]


async def test_push_test_mode_plays_the_sample_and_reports_playback(start_server, assets, tmp_path) -> None:
    from playwright.async_api import async_playwright

    app = await start_server()
    wav = pcm_wav(assets / "silence_48k_3s.wav", tmp_path / "mic.wav")
    async with async_playwright() as p:
        context = await open_browser(p, wav, tmp_path / "profile")
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto(app.url)
        await page.select_option("#mode", "push")
        await page.select_option("#codec", "h264")
        await page.click("#start")
        await page.wait_for_function("window.liveavatar.events.some((e) => e.type === 'started')", timeout=20_000)
        await page.evaluate(INSTALL)
        await asyncio.sleep(2)
        probe = json.loads(await page.evaluate(COLLECT))
        await page.click("#interrupt")
        finished = await page.wait_for_function(
            "window.liveavatar.events.find((e) => e.type === 'finished')", timeout=10_000
        )
        finished = await finished.json_value()
        stats = await page.evaluate("window.liveavatar.stats")
        await context.close()
    print(
        f"browser push: connected {stats['connectedMs']} ms, first frame {stats['firstFrameMs']} ms, "
        f"{media_fps(probe['frames']):.1f} fps over media time, "
        f"codec {stats['codec']}"
    )
    assert finished["interrupted"] is True and finished["position"] < 10.7
    assert stats["codec"] == "H264"  # the browser preferred H.264 and the server followed
    assert stats["framesShown"] > 0
    assert media_fps(probe["frames"]) >= 24
    assert probe["audio"]["samples"] > 48_000 and probe["audio"]["energy"] > 0


async def test_page_shows_backend_poster_and_queues_pushes_each_with_its_finished(
    start_server, assets, tmp_path
) -> None:
    """Before Start the badge names the backend and the video shows the poster; the push row shows only in
    push mode; Start pushes the sample once and "Push sample" pressed meanwhile queues a second utterance
    behind it, each with its own `finished`; Stop clears the figures and shows the poster again."""
    from playwright.async_api import async_playwright

    from liveavatar.media_io import decode_audio

    app = await start_server()
    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as w:  # served as the page's sample: two 2.5 s utterances keep the test short
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(
            (decode_audio(assets / "speech_en_16k.wav").samples[8_000:48_000] * 32767).astype("<i2").tobytes()
        )
    wav = pcm_wav(assets / "silence_48k_3s.wav", tmp_path / "mic.wav")
    async with async_playwright() as p:
        context = await open_browser(p, wav, tmp_path / "profile")
        page = context.pages[0] if context.pages else await context.new_page()
        failed: list[str] = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        await page.route(
            "**/sample.wav", lambda route: route.fulfill(body=short.read_bytes(), content_type="audio/wav")
        )
        await page.goto(app.url)
        await page.wait_for_function(
            "document.getElementById('backend').textContent.includes('preview')", timeout=10_000
        )
        poster_ok = await page.evaluate("fetch(document.getElementById('video').poster).then((r) => r.ok)")
        assert not await page.is_visible("#push-row")
        await page.select_option("#mode", "push")
        assert await page.is_visible("#push-row") and "Start speaks the sample once" in await page.inner_text(
            "#push-row"
        )

        await page.click("#start")
        await page.wait_for_function("window.liveavatar.stats.connected", timeout=20_000)
        await page.click("#push")  # while Start's push is still being sent
        await page.wait_for_function(
            "window.liveavatar.events.filter((e) => e.type === 'finished').length >= 2", timeout=30_000
        )
        events = await page.evaluate(
            "window.liveavatar.events.filter((e) => ['started', 'finished'].includes(e.type))"
            ".map((e) => [e.type, e.utterance, e.interrupted, e.position])"
        )
        await page.wait_for_function("window.liveavatar.stats.fps > 0", timeout=5_000)
        await page.click("#stop")
        stats = await page.evaluate("window.liveavatar.stats")
        line = await page.inner_text("#stats")
        showing_poster = await page.evaluate("document.getElementById('video').srcObject === null")
        badge = await page.inner_text("#backend")
        await context.close()
    assert not failed, failed  # no favicon 404, no missing poster
    assert poster_ok
    assert [e[:3] for e in events] == [
        ["started", 1, False],
        ["finished", 1, False],
        ["started", 2, False],
        ["finished", 2, False],
    ], events
    assert all(abs(e[3] - 2.5) < 0.5 for e in events if e[0] == "finished"), "each utterance played whole"
    assert line == "stopped" and stats["fps"] == 0 and stats["lagMs"] is None and stats["framesShown"] == 0
    assert showing_poster and "preview" in badge
