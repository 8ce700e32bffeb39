"""GPU sets (`--gpus N`, or `--devices` naming each set's device): one model replica per set with its own
worker and admission. Sessions are spread over the sets, a set's replica makes the frames a one-set
server makes, every set full means `busy`, and a closed session frees its set. On this CPU-only machine
the sets are built with `devices=cpu,cpu` (the tiny random model); the CUDA checks are configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch
from server_peer import PeerClient, offer_reply

from liveavatar.backends.preview.generator import PreviewGenerator
from liveavatar.generator import AudioWindow, AvatarSpec, Size
from server import serve_cmd
from server.admission import GIB, Admission
from server.config import ConfigError, ServerConfig, load_config
from server.gpusets import GpuSet, GpuSets
from server.load import LoadMeter
from server.model import build_generators, resolve_devices
from server.protocol import ProtocolError
from server.worker import GpuWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = Size(128, 128)
TWO_SETS = {
    "backend": "liveavatar", "random_weights": "tiny", "motion_frames": 5, "size": "128*128",
    "devices": ["cpu", "cpu"], "realtime_capacity": 0,
}  # fmt: skip


def set_metrics(app: Any) -> dict[str, float]:
    text = urllib.request.urlopen(app.url + "metrics").read().decode()
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("liveavatar_gpu_set_")
    }


async def sessions_per_set(app: Any) -> list[float]:
    found = await asyncio.to_thread(set_metrics, app)
    return [found[f'liveavatar_gpu_set_sessions{{set="{i}",device="cpu"}}'] for i in range(2)]


async def blocks_made(app: Any, *clients: PeerClient, count: int = 1, timeout: float = 60) -> None:
    """Until each client's session has generated `count` blocks (the VAE cache is then measured)."""

    async def one(client: PeerClient) -> None:
        session = app.registry.get(client.session)
        while session.stream.blocks < count:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients)), timeout)


def window(index: int) -> AudioWindow:
    samples = (np.random.default_rng(70 + index).standard_normal(7680) * 0.1).astype(np.float32)
    return AudioWindow(samples=samples, speech=True, index=index)


async def stream(worker: GpuWorker, gen: Any, spec: AvatarSpec, blocks: int) -> list[np.ndarray]:
    state = await worker.run("s", gen.open, spec, SIZE)
    frames = [await worker.run("s", gen.step, state, window(i)) for i in range(blocks)]
    await worker.run("s", gen.close, state)
    return frames


async def test_each_set_is_a_copy_of_the_model_that_makes_the_frames_of_a_one_set_server(tiny_liveavatar) -> None:
    config = ServerConfig(**TWO_SETS).validate()
    generators, info = await asyncio.to_thread(build_generators, config)
    assert info.devices == ["cpu", "cpu"] and info.to_message()["devices"] == ["cpu", "cpu"]
    assert not [n for n in info.notes if "gpus" in n]  # applied, not a "not applied" note
    first, second = (dict(g.pipeline.dit.named_parameters()) for g in generators)
    for name, weight in first.items():  # the same values in a memory of its own
        assert torch.equal(weight, second[name]) and weight.data_ptr() != second[name].data_ptr(), name

    spec = AvatarSpec(
        image=(np.random.default_rng(4).random((96, 80, 3)) * 255).astype(np.uint8), prompt="a man speaks", seed=7
    )
    worker = GpuWorker(1)
    try:
        on_set_1 = await stream(worker, generators[1], spec, 2)
        one_set = await stream(worker, tiny_liveavatar, spec, 2)  # `--random-weights tiny` on one set
    finally:
        worker.close()
    for x, y in zip(on_set_1, one_set, strict=True):
        assert np.array_equal(x, y)


async def test_sessions_are_spread_over_the_sets_and_each_streams_from_its_own(start_server) -> None:
    app = await start_server(**TWO_SETS)
    ws = app.url.replace("http", "ws") + "ws"
    a, b = await PeerClient(ws, keep_video=False).connect(), await PeerClient(ws, keep_video=False).connect()
    assert a.config["model"]["devices"] == ["cpu", "cpu"]
    try:
        await a.start(mode="push", prompt="first")
        await b.start(mode="push", prompt="second")
        placed = [app.sets.of(a.session), app.sets.of(b.session)]
        assert [s.index for s in placed] == [0, 1]
        assert [app.registry.get(c.session).stream.worker for c in (a, b)] == [s.worker for s in placed]
        assert await sessions_per_set(app) == [1, 1]
        await asyncio.gather(a.wait_frames(5, timeout=60), b.wait_frames(5, timeout=60))

        seen = len(b.messages)  # a switch is prepared and applied on the session's own set
        await b.send({"type": "switch", "prompt": "switched on set one"})
        await b.wait_for("switched", after=seen, timeout=30)
        assert "switched on set one" in placed[1].generator._texts
        assert "switched on set one" not in placed[0].generator._texts
    finally:
        await a.close()
        await b.close()


async def test_a_closed_session_frees_its_set_for_the_next_one(start_server) -> None:
    app = await start_server(**TWO_SETS)
    ws = app.url.replace("http", "ws") + "ws"
    a, b, c = [await PeerClient(ws, keep_video=False).connect() for _ in range(3)]
    try:
        await a.start(mode="push")
        await b.start(mode="push")
        await a.close()
        while app.sets[0].admission.sessions or app.sets[0].sessions:
            await asyncio.sleep(0.05)
        assert await sessions_per_set(app) == [0, 1]
        await c.start(mode="push")  # the set with fewest sessions: the one a left
        assert app.sets.of(c.session).index == 0 and app.sets[0].sessions == {c.session}
        await c.wait_frames(5, timeout=60)
    finally:
        for client in (a, b, c):
            await client.close()


async def test_when_every_set_is_full_the_next_client_is_busy_and_the_others_keep_streaming(
    start_server, tiny_liveavatar
) -> None:
    if tiny_liveavatar.session_nbytes(SIZE) == tiny_liveavatar.dit.state_nbytes(16, 16):  # VAE cache not measured yet
        worker = GpuWorker(1)
        try:
            await stream(worker, tiny_liveavatar, AvatarSpec(image=np.zeros((64, 64, 3), np.uint8)), 1)
        finally:
            worker.close()
    running = tiny_liveavatar.session_nbytes(SIZE)  # what a session holds once it has made a block
    app = await start_server(**TWO_SETS, memory_budget_gib=1.5 * running / GIB)  # one running session per set
    ws = app.url.replace("http", "ws") + "ws"
    a, b, c = [await PeerClient(ws, keep_video=False).connect() for _ in range(3)]
    try:
        await a.start(mode="push")
        await b.start(mode="push")
        await blocks_made(app, a, b)
        assert [app.sets.of(x.session).index for x in (a, b)] == [0, 1]

        busy = await asyncio.wait_for(offer_reply(c), 30)
        assert busy["code"] == "busy" and busy["retryAfterS"] > 0, busy
        assert "all 2 GPU sets are full" in busy["message"] and "set 1 (cpu)" in busy["message"], busy
        await asyncio.gather(a.wait_frames(5, timeout=60), b.wait_frames(5, timeout=60))  # unaffected

        await b.close()  # its set takes the next session
        while app.sets[1].admission.sessions:
            await asyncio.sleep(0.05)
        await c.start(mode="push")
        assert app.sets.of(c.session).index == 1
        await c.wait_frames(5, timeout=60)
    finally:
        for client in (a, b, c):
            await client.close()


class Sized:
    failure = None

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def session_nbytes(self, size: Size) -> int:
        return self.nbytes


def fake_sets(count: int, budget_sessions: int) -> GpuSets:
    sets = []
    for i in range(count):
        admission = Admission(Sized(GIB), LoadMeter(), 0.48, budget_gib=budget_sessions)
        sets.append(GpuSet(i, f"cuda:{i}", admission.generator, None, admission, None))  # type: ignore[arg-type]
    return GpuSets(sets)


def test_placement_takes_the_set_with_fewest_sessions_and_says_when_all_are_full() -> None:
    sets = fake_sets(3, budget_sessions=2)
    assert [sets.place(sid, SIZE).index for sid in "abcd"] == [0, 1, 2, 0]  # ties: lowest index
    sets.release("b")
    assert sets.place("e", SIZE).index == 1  # b's set has room again
    sets.place("f", SIZE)
    sets.place("g", SIZE)
    with pytest.raises(ProtocolError) as busy:
        sets.place("h", SIZE)
    assert busy.value.code == "busy" and busy.value.retry_after_s == 60
    assert busy.value.message.startswith("server busy: all 3 GPU sets are full (set 0 (cuda:0): a session needs")
    assert sets.of("h") is None and sum(s.admission.sessions for s in sets) == 6

    one = fake_sets(1, budget_sessions=1)
    one.place("a", SIZE)
    with pytest.raises(ProtocolError, match=r"^server busy: a session needs 1.00 GiB; 0.00 GiB of the 1.00 GiB budget"):
        one.place("b", SIZE)  # one set: the refusal reads as it did before sets


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_devices_are_parsed_from_flags_and_environment_and_shown_by_print_config(capsys) -> None:
    model = ("--backend", "liveavatar", "--random-weights", "tiny")
    assert serve_cmd.config_from_args(cli(*model, "--devices", "cpu,cpu")).devices == ["cpu", "cpu"]
    env = {
        "LIVEAVATAR_BACKEND": "liveavatar",
        "LIVEAVATAR_RANDOM_WEIGHTS": "tiny",
        "LIVEAVATAR_DEVICES": "cuda:0, CUDA:1",
    }
    assert load_config(env=env).devices == ["cuda:0", "cuda:1"]
    assert load_config(env={**env, "LIVEAVATAR_DEVICES": "cuda"}).devices == ["cuda:0"]
    assert load_config(env=env, overrides={"gpus": 2}).devices == ["cuda:0", "cuda:1"]  # they agree
    assert serve_cmd.run(cli(*model, "--devices", "cpu,cpu", "--print-config")) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == ["cpu", "cpu"]


@pytest.mark.parametrize(
    ("devices", "fields", "message"),
    [
        ("gpu0,gpu1", {}, "'gpu0' is not a device"),
        ("cuda:0,cuda:x", {}, "'cuda:x' is not a device"),
        ("cuda:1,cuda:1", {}, "names a GPU twice"),
        ("cuda:0,cuda:1", {"gpus": 3}, "disagree"),
        ("cpu,cpu", {"backend": "preview", "random_weights": ""}, "for the liveavatar backend"),
    ],
)
def test_bad_devices_are_refused_with_a_reason(devices, fields, message) -> None:
    overrides = {"backend": "liveavatar", "random_weights": "tiny", "devices": devices, **fields}
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=overrides)


def test_gpus_the_machine_does_not_have_are_a_config_error_and_present_ones_become_sets(monkeypatch) -> None:
    config = load_config(env={}, overrides={"backend": "liveavatar", "random_weights": "tiny", "gpus": 2})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"--gpus 2 needs 2 CUDA devices, but 0 CUDA devices are visible .*--devices cpu,cpu"
    ):
        resolve_devices(config)
    with pytest.raises(ConfigError, match="devices names cuda:1, but 0 CUDA devices are visible"):
        resolve_devices(load_config(env={}, overrides={**TWO_SETS, "devices": "cpu,cuda:1"}))
    assert resolve_devices(ServerConfig().validate()) == ["cpu"]  # preview: one set
    assert resolve_devices(ServerConfig(**{**TWO_SETS, "devices": []}).validate()) == ["cpu"]  # default: one set

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices(config) == ["cuda:0", "cuda:1"]
    assert resolve_devices(ServerConfig(**{**TWO_SETS, "devices": []}).validate()) == ["cuda"]  # as before sets
    with pytest.raises(ConfigError, match="--gpus 4 needs 4 CUDA devices, but 2 CUDA devices are visible"):
        resolve_devices(load_config(env={}, overrides={"backend": "liveavatar", "random_weights": "tiny", "gpus": 4}))


async def test_serve_with_more_gpus_than_the_machine_has_stops_at_start_with_the_reason(start_server) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="--gpus 2 needs 2 CUDA devices"):
        await start_server(backend="liveavatar", random_weights="tiny", gpus=2)


class PrepareThreads(PreviewGenerator):
    """Records which thread encodes each new avatar (`prepare`)."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[tuple[str, str]] = []

    def prepare(self, spec: AvatarSpec, size: Size) -> None:
        self.prepared.append((spec.prompt, threading.current_thread().name))


async def test_new_avatars_are_encoded_on_one_long_lived_helper_thread_per_set(start_server) -> None:
    """Every thread that runs a matmul on a GPU keeps a cuBLAS workspace there while it lives: encodings
    spread over a pool of threads would grow a set's memory by 32 MiB per thread woken. One helper thread per
    set, which encodes the default avatar at start, keeps that fixed from the first session on."""
    generator = PrepareThreads()
    app = await start_server(generator=generator)
    assert [prompt for prompt, _ in generator.prepared] == [""]  # the default avatar, at start
    clients = []
    try:
        for prompt in ("first", "second"):
            client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
            clients.append(client)
            await client.start(mode="push", prompt=prompt)
        seen = len(clients[0].messages)
        await clients[0].send({"type": "switch", "prompt": "third"})
        await clients[0].wait_for("switched", after=seen, timeout=30)
    finally:
        for client in clients:
            await client.close()
    assert [prompt for prompt, _ in generator.prepared] == ["", "first", "second", "third"]
    threads = {name for _, name in generator.prepared}
    assert len(threads) == 1 and "prepare" in threads.pop()


class FailingDefaultEncode(PrepareThreads):
    def prepare(self, spec: AvatarSpec, size: Size) -> None:
        super().prepare(spec, size)
        if spec.prompt == "":
            raise RuntimeError("no memory for the default avatar")


async def test_a_default_avatar_that_fails_to_encode_at_start_is_logged_and_the_server_serves(
    start_server, caplog
) -> None:
    generator = FailingDefaultEncode()
    app = await start_server(generator=generator)  # a head start only: the start goes on
    assert "encoding the default avatar at start failed" in caplog.text
    client = await PeerClient(app.url.replace("http", "ws") + "ws", keep_video=False).connect()
    try:
        await client.start(mode="push", prompt="later")
    finally:
        await client.close()
    assert [prompt for prompt, _ in generator.prepared] == ["", "later"]
