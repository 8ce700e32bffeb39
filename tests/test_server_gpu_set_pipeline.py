"""One session over a GPU set in the server (`--gpus-per-session N`): the set's generator runs one
rank process per device and the session keeps blocks in flight. On this CPU-only machine the set is
`--devices cpu,cpu --gpus-per-session 2` (gloo ranks, the tiny random model): a pushed utterance plays
with its events, switch and interrupt work, the set frees its session, a rank that dies ends only the
sessions of its set with a clear error, and the server's stop ends the rank processes."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from server_peer import PeerClient
from test_push_mode import speech_16k

from server.config import ConfigError, ServerConfig, load_config
from server.model import resolve_devices

PIPELINED = {
    "backend": "liveavatar", "random_weights": "tiny", "motion_frames": 5, "size": "128*128",
    "devices": ["cpu", "cpu"], "gpus_per_session": 2, "realtime_capacity": 0,
}  # fmt: skip


async def test_a_session_over_a_two_rank_set_plays_switches_interrupts_and_frees_its_set(start_server, assets):
    app = await start_server(**PIPELINED)
    generator = app.sets[0].generator
    assert generator.pipeline_depth == 2 and len(app.sets) == 1
    client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
    assert client.config["model"]["devices"] == ["cpu+cpu"]
    try:
        await client.start(mode="push", prompt="first")
        await client.wait_frames(12, timeout=120)
        session = app.registry.get(client.session)
        assert session.stream.generator is generator and session.stream.sample_steps == 0  # no step governor on a set
        await client.send(client.push_b64(speech_16k(assets, 2.0)))
        await client.send({"type": "push_end"})
        await client.wait_for("started", timeout=60)
        await client.wait_for("finished", timeout=60)
        seen = len(client.messages)
        await client.send({"type": "switch", "prompt": "second"})
        await client.wait_for("switched", after=seen, timeout=60)
        await client.send(client.push_b64(speech_16k(assets, 3.0)))
        await client.wait_for("started", after=seen, timeout=60)
        await client.send({"type": "interrupt"})
        finished = await client.wait_for("finished", after=seen, timeout=60)
        assert finished["interrupted"] is True
        assert app.sets[0].worker.load.block_seconds() > 0  # the pipeline's interval, for admission
        assert generator.session_nbytes(app.size) > 0
    finally:
        await client.close()
    for _ in range(100):
        if not app.sets[0].sessions:
            break
        await asyncio.sleep(0.05)
    assert not app.sets[0].sessions and app.sets[0].admission.sessions == 0
    procs = list(generator._procs)
    assert all(p.is_alive() for p in procs)
    await app.stop()
    assert not any(p.is_alive() for p in procs)


async def test_a_dead_rank_ends_its_sessions_with_an_error_and_the_server_carries_on(start_server):
    app = await start_server(**PIPELINED)
    client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
    try:
        await client.start(mode="push")
        await client.wait_frames(5, timeout=120)
        app.sets[0].generator._procs[1].kill()
        error = await client.wait_for("error", timeout=60)
        assert error["code"] == "generation_failed" and "rank" in error["message"]
        await client.wait_for("closed", timeout=30)
        other = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
        try:  # the server still answers; a new session on the broken set gets a clear error
            with pytest.raises(TimeoutError, match="no answer"):  # an error instead
                await other.start(mode="push")
            reply = await other.wait_for("error", timeout=30)
            assert reply["code"] == "generation_failed" and "restart" in reply["message"]
            health = await asyncio.to_thread(_status, app.url + "healthz")
            assert health == 503
        finally:
            await other.close()
    finally:
        await client.close()


def _status(url: str) -> int:
    try:
        return urllib.request.urlopen(url).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_gpus_per_session_groups_the_devices_into_sets():
    config = ServerConfig(**{**PIPELINED, "devices": ["cpu"] * 4}).validate()
    assert resolve_devices(config) == ["cpu+cpu", "cpu+cpu"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"devices": ["cpu"] * 3}, "do not split into sets"),
        ({"gpus_per_session": 9}, "1..8"),
        ({"backend": "preview", "random_weights": "", "devices": []}, "liveavatar backend"),
        ({"cuda_graphs": True}, "cuda-graphs"),
    ],
)
def test_unusable_gpus_per_session_is_a_clear_config_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides={**PIPELINED, **fields})
