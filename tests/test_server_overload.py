"""The overload path on the CPU: a generator slower than real time, in mic and push mode.

`SlowGenerator` needs 0.45 s + 0.1 s per denoising step for a 0.48 s block, so it stays behind real
time even at the governor's fewest steps (2 steps: 0.65 s). That is where the mic reader used to die
(dropping a window that was not the first compared numpy arrays) and where the lag went past the
bound the server reported. Everything is judged by the server's own reports and invariants (lag
against the bound of the same block, windows dropped, steps in use), never by wall time here.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from server_peer import ArrayAudioTrack, PeerClient
from slow_backend import SlowGenerator, register_slow_backend

from liveavatar.generator import AudioWindow
from liveavatar.media_io import decode_audio
from server.feed import AudioFeed
from server.segmenter import Segmenter

STREAM_S = 12.0


def speech_with_pauses(assets) -> np.ndarray:
    pcm = decode_audio(assets / "speech_with_pauses_48k.wav", rate=48_000).samples
    return (np.tile(pcm, 2) * 32767).astype(np.int16)


def stats_of(client: PeerClient) -> list[dict]:
    return [m for m in client.messages if m.get("type") == "stats"]


def assert_lag_within_its_bound(stats: list[dict]) -> None:
    lags = [(m["lagMs"], m["maxLagMs"]) for m in stats if m.get("lagMs") is not None]
    assert len(lags) >= 3, stats
    over = [(lag, bound) for lag, bound in lags if lag > bound]
    assert not over, f"lag past the bound it was reported with: {over}"


async def stream_mic(app, assets, clients: int = 1) -> list[PeerClient]:
    ws = app.url.replace("http", "ws") + "ws"
    peers = [await PeerClient(ws, thumb=32).connect() for _ in range(clients)]
    for peer in peers:
        await peer.start(mode="mic", mic=ArrayAudioTrack(speech_with_pauses(assets)))
    await asyncio.sleep(STREAM_S)
    return peers


@pytest.fixture
def slow_backend():
    """`slow_backend(**timings)`: the slow backend registered by name for this test."""
    from liveavatar.backends import unregister

    yield register_slow_backend
    unregister("slow")


def mic_reader_alive(session) -> bool:
    return any(t.get_name().startswith("mic-") and not t.done() for t in session.transport.tasks)


async def test_a_mic_session_behind_real_time_keeps_its_mic_reader_and_its_lag_within_the_bound(
    start_server, assets, slow_backend
) -> None:
    backend = slow_backend(base_s=0.45, per_step_s=0.1)
    app = await start_server(backend="slow", size="128*128", realtime_capacity=0)  # chosen by name, as any backend
    (gen,) = backend.built
    assert app.generator is gen and app.sets[0].worker.threads == 1 and app.sets[0].governor is not None
    (client,) = await stream_mic(app, assets)
    try:
        session = app.registry.get(client.session)
        assert mic_reader_alive(session), "the mic reader died"
        assert session.stream.feed.dropped_windows > 0  # the generator is behind: windows had to go
        stats = stats_of(client)
        assert_lag_within_its_bound(stats)
        # the client is told; its last report is up to a report interval older than the live counter
        assert 0 < stats[-1]["droppedWindows"] <= session.stream.feed.dropped_windows
        # the governor lowered the steps, and the client was told
        assert min(m["sampleSteps"] for m in stats) == 2 and stats[0]["sampleSteps"] == 4
        assert 2 in gen.steps_run and 4 in gen.steps_run
        await client.send({"type": "stop"})
        closed = await client.wait_for("closed", timeout=10)
        assert closed["session"] == session.id
    finally:
        await client.close()
    for _ in range(100):
        if not len(app.registry):
            break
        await asyncio.sleep(0.05)
    assert not len(app.registry)
    assert not any("Task exception" in m.get("message", "") for m in client.messages if m.get("type") == "error")


async def test_two_mic_sessions_sharing_one_slow_worker_both_keep_their_lag_within_the_bound(
    start_server, assets
) -> None:
    gen = SlowGenerator(base_s=0.25, per_step_s=0.05)  # alone it keeps up (0.45 s); two of them do not
    app = await start_server(generator=gen, size="128*128", realtime_capacity=0, max_sessions=2)
    peers = await stream_mic(app, assets, clients=2)
    try:
        for peer in peers:
            session = app.registry.get(peer.session)
            assert session is not None and mic_reader_alive(session)
            assert_lag_within_its_bound(stats_of(peer))
        assert sum(app.registry.get(p.session).stream.feed.dropped_windows for p in peers) > 0
    finally:
        for peer in peers:
            await peer.close()


async def test_pushed_audio_behind_real_time_is_never_dropped_or_trimmed(start_server, assets) -> None:
    gen = SlowGenerator(base_s=0.3, per_step_s=0.1)
    app = await start_server(generator=gen, size="128*128", realtime_capacity=0)
    client = await PeerClient(app.url.replace("http", "ws") + "ws", thumb=32).connect()
    try:
        await client.start(mode="push")
        speech = decode_audio(assets / "speech_en_16k.wav", rate=16_000).samples[: 16_000 * 4]
        await client.send(client.push_b64((speech * 32767).astype(np.int16)))
        await client.send({"type": "push_end"})
        finished = await client.wait_for("finished", timeout=40)
        stats = stats_of(client)
    finally:
        await client.close()
    assert not finished["interrupted"]
    assert finished["position"] == pytest.approx(4.0, abs=0.05)  # every pushed sample played
    assert stats[-1]["droppedWindows"] == 0 and stats[-1]["trimmedFrames"] == 0


def test_a_mic_feed_behind_real_time_drops_idle_windows_first_then_the_oldest() -> None:
    seen: list = []
    feed = AudioFeed(Segmenter(16_000, 7680), lambda e, t: seen.append(e), max_pending_windows=3)
    feed.mic_origin = 0  # mic audio has arrived: the feed now bounds its queue

    def window(i: int, speech: bool):
        return feed._item(AudioWindow(np.zeros(7680, np.float32), speech=speech, index=i), 0.0, synthesized=False)

    for i, speech in enumerate([True, False, True, False]):
        feed._enqueue(window(i, speech))
    assert [w.window.index for w in feed._pending] == [0, 2, 3]  # the idle window in the middle went first
    feed._enqueue(window(4, True))
    assert [w.window.index for w in feed._pending] == [0, 2, 4]  # then the idle one at the back
    feed._enqueue(window(5, True))
    assert [w.window.index for w in feed._pending] == [2, 4, 5]  # no idle left: the oldest
    assert feed.dropped_windows == 3


def test_the_real_time_plan_says_which_step_count_keeps_up_or_which_settings_would() -> None:
    from server.load import plan_realtime

    # the H200 figures at 704*384 (docs/benchmarks.md): 16 ms audio + 112 ms VAE, 190 ms per DiT step
    h200 = plan_realtime(0.128, 0.190, full_steps=4, min_steps=2, block_duration=0.48, width=704, height=384)
    assert not h200.keeps and h200.steps == 2 and h200.block_s == pytest.approx(0.508)
    assert "--sample-steps 1" in h200.advice and "at most 640*320" in h200.advice
    small = plan_realtime(0.05, 0.06, full_steps=4, min_steps=2, block_duration=0.48, width=384, height=256)
    assert small.keeps and small.steps == 4 and small.to_message()["blockMs"] == 290
    middle = plan_realtime(0.1, 0.1, full_steps=4, min_steps=2, block_duration=0.48, width=512, height=512)
    assert middle.keeps and middle.steps == 3 and not middle.advice


async def test_a_server_that_cannot_keep_real_time_says_so_in_stats_and_metrics(start_server) -> None:
    import urllib.request

    gen = SlowGenerator(base_s=0.0, per_step_s=0.0)
    app = await start_server(generator=gen, size="128*128")
    app.model.realtime = {"keeps": False, "steps": 2, "blockMs": 508, "advice": "a size of at most 640*320"}
    client = await PeerClient(app.url.replace("http", "ws") + "ws", thumb=32).connect()
    try:
        await client.start(mode="push")
        stats = await client.wait_for("stats", timeout=10)
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(app.url + "metrics").read().decode())
    finally:
        await client.close()
    assert stats["realtime"]["keeps"] is False and "640*320" in stats["realtime"]["advice"]
    assert "liveavatar_realtime_ok 0" in body and 'liveavatar_realtime_block_seconds{steps="2"} 0.508' in body


def test_the_warm_up_profile_becomes_the_real_time_plan() -> None:
    from types import SimpleNamespace

    from liveavatar.backends.liveavatar.generator import BlockProfile
    from liveavatar.backends.liveavatar.warmup import steady_costs
    from liveavatar.generator import Size
    from server.model import realtime_plan

    steady = [BlockProfile(audio_ms=16, dit_ms=760, vae_ms=112, total_ms=888, steps=4)] * 2
    generator = SimpleNamespace(default_size=Size(704, 384), sample_steps=4, frames_per_block=12, fps=25)
    plan = realtime_plan(steady_costs(steady, generator), block_s=0.48)
    assert plan == {"keeps": False, "steps": 2, "blockMs": 508, "advice": plan["advice"]}
    assert "704*384" in plan["advice"]


def test_cuda_graphs_on_several_gpu_sets_is_refused_with_the_reason() -> None:
    from server.config import ConfigError, load_config

    base = {"backend": "liveavatar", "random_weights": "tiny", "cuda_graphs": True}
    with pytest.raises(ConfigError, match="one GPU set"):
        load_config(env={}, overrides=base | {"devices": "cpu,cpu"})
    with pytest.raises(ConfigError, match="one worker thread"):
        load_config(env={}, overrides=base | {"workers": 2})
    assert load_config(env={}, overrides=base).cuda_graphs
