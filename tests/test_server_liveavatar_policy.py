"""The liveavatar server's policies in isolation: settings and checkpoint layout, admission control,
speech before idle on the worker, fewer denoising steps under load, and idle filler that moves."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from liveavatar.backends.liveavatar.build import resolve_checkpoint
from liveavatar.backends.liveavatar.generator import step_subset
from liveavatar.generator import AudioWindow, AvatarSpec, Size
from server.admission import GIB, Admission
from server.config import ConfigError, load_config
from server.load import LoadMeter, StepGovernor
from server.media import Block, MediaClock
from server.protocol import ProtocolError
from server.worker import GpuWorker

SIZE = Size(128, 128)


def test_the_docker_checkpoint_variable_and_the_model_flags_reach_the_config(tmp_path) -> None:
    env = {"LIVEAVATAR_CHECKPOINTS": str(tmp_path), "LIVEAVATAR_BACKEND": "liveavatar"}
    config = load_config(env=env, overrides={"sample_steps": 3, "engine": "compile", "fp8": True})
    assert (config.checkpoints, config.sample_steps, config.engine, config.fp8) == (str(tmp_path), 3, "compile", True)
    with pytest.raises(ConfigError, match="needs --ckpt-dir"):
        load_config(env={}, overrides={"backend": "liveavatar"})
    with pytest.raises(ConfigError, match="motion-frames"):
        load_config(env={}, overrides={"backend": "liveavatar", "random_weights": "tiny", "motion_frames": 6})


def test_a_checkpoint_root_finds_the_model_folder_and_the_lora_beside_it(tmp_path) -> None:
    (tmp_path / "Wan2.2-S2V-14B").mkdir()
    (tmp_path / "LiveAvatar").mkdir()
    (tmp_path / "LiveAvatar" / "liveavatar.safetensors").write_bytes(b"")
    assert resolve_checkpoint(str(tmp_path)) == (
        tmp_path / "Wan2.2-S2V-14B",
        tmp_path / "LiveAvatar" / "liveavatar.safetensors",
    )
    assert resolve_checkpoint(str(tmp_path / "Wan2.2-S2V-14B"))[1] == tmp_path / "LiveAvatar" / "liveavatar.safetensors"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing"))


class Sized:
    """A generator double that only knows its per-session memory."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def session_nbytes(self, size: Size) -> int:
        return self.nbytes


def test_admission_refuses_what_would_not_keep_real_time_with_a_retry_hint() -> None:
    meter = LoadMeter()
    admission = Admission(Sized(0), meter, block_duration=0.48, realtime_capacity=1.0)
    admission.admit("a", SIZE)  # nothing measured, nobody running: a slow GPU still serves one
    meter.record(0.2)
    admission.admit("b", SIZE)  # 2 x 0.2 s fits in 0.48 s
    with pytest.raises(ProtocolError) as refused:
        admission.admit("c", SIZE)  # 3 x 0.2 s does not
    assert refused.value.code == "busy" and refused.value.retry_after_s > 0
    admission.release("b")
    admission.admit("c", SIZE)


def test_admission_counts_memory_admitted_sessions_have_yet_to_allocate_on_the_gpu() -> None:
    free = 90 * GIB
    admission = Admission(Sized(40 * GIB), LoadMeter(), 0.48, cuda_memory=lambda: (free, 141 * GIB, 0))
    admission.admit("a", SIZE, holding=lambda: 0)  # admitted, rings not allocated yet
    with pytest.raises(ProtocolError, match="GiB of GPU memory"):  # 90 - 40 to come - 11 reserve < 40
        admission.admit("b", SIZE)
    budgeted = Admission(Sized(3 * GIB), LoadMeter(), 0.48, budget_gib=5)
    budgeted.admit("a", SIZE)
    with pytest.raises(ProtocolError, match="budget"):
        budgeted.admit("b", SIZE)


def test_the_step_governor_lowers_steps_while_behind_real_time_and_restores_them_after() -> None:
    now = [0.0]
    meter = LoadMeter()
    governor = StepGovernor(meter, full_steps=4, block_duration=0.48, min_steps=2, hold_s=2.0, clock=lambda: now[0])
    meter.record(0.3)
    now[0] = 3.0
    assert governor.update(sessions=2) == 3  # 2 x 0.3 s > 0.48 s
    assert governor.update(sessions=2) == 3  # held for hold_s
    meter.record(0.26)
    now[0] = 6.0
    assert governor.update(sessions=2) == 2
    meter.record(0.2)
    now[0] = 9.0
    assert governor.update(sessions=2) == 2  # never below min_steps
    meter.record(0.1)
    now[0] = 12.0
    assert governor.update(sessions=1) == 3  # 0.1 x 3/2 is far below real time


async def test_the_worker_runs_speech_blocks_before_waiting_idle_blocks() -> None:
    worker = GpuWorker(1)
    order: list[str] = []
    started = threading.Event()

    def job(tag: str) -> None:
        started.set()
        time.sleep(0.05)
        order.append(tag)

    try:
        first = asyncio.create_task(worker.run("a", job, "busy"))
        await asyncio.to_thread(started.wait, 5)
        idle = [asyncio.create_task(worker.run(k, job, f"idle-{k}", urgent=False)) for k in ("b", "c")]
        await asyncio.sleep(0.01)
        speech = asyncio.create_task(worker.run("d", job, "speech"))
        await asyncio.gather(first, speech, *idle)
    finally:
        worker.close()
    assert order[:2] == ["busy", "speech"], order


async def test_an_idle_avatar_waiting_for_its_next_block_keeps_moving_back_and_forth() -> None:
    clock = MediaClock(25, np.zeros((4, 4, 3), np.uint8))
    frames = np.stack([np.full((4, 4, 3), 10 + i, np.uint8) for i in range(4)])
    await clock.put(Block(frames, np.zeros(4 * 1920, np.int16), preemptible=True))
    shown = [int(clock.slot(n).image[0, 0, 0]) for n in range(11)]
    assert shown == [10, 11, 12, 13, 12, 11, 10, 11, 12, 13, 12]
    assert clock.filler_slots == 7


def test_fewer_steps_run_an_even_subset_and_still_fill_every_ring(tiny_liveavatar, one_torch_thread) -> None:
    assert step_subset(4, 4) == [0, 1, 2, 3] and step_subset(4, 3) == [0, 2, 3] and step_subset(4, 2) == [0, 3]
    gen = tiny_liveavatar
    state = gen.open(AvatarSpec(image=np.full((64, 64, 3), 128, np.uint8), seed=1), SIZE)
    assert gen.set_sample_steps(state, 2) == 2
    frames = gen.step(state, AudioWindow(samples=np.zeros(7680, np.float32)))
    assert frames.shape == (12, 128, 128, 3)
    rings = state.stream.branches[0].rings
    assert all(k is not None for ring in rings for k in ring.k)  # skipped steps' rings got this block
    sigmas = gen.dit.sampler.sigmas
    block = 3 * rings[0].frame_tokens
    for skipped in (1, 2):  # each holds the block of the run step nearest in noise level, in the same slot
        source = min((0, 3), key=lambda s: abs(float(sigmas[s] - sigmas[skipped])))
        for layer in range(len(rings[0].k)):
            (k, v), (sk, sv) = rings[skipped].history(layer), rings[source].history(layer)
            assert torch.equal(k[:, :block], sk[:, :block]) and torch.equal(v[:, :block], sv[:, :block])
            assert not k[:, block:].any(), "slots of frames not generated yet stay empty"
    assert gen.set_sample_steps(state, None) == 4
    gen.close(state)


def test_sizes_are_resolved_for_the_dit_at_start() -> None:
    from server.config import ConfigError, ServerConfig

    # the original's 688*368 preset is an area limit: the DiT (multiples of 64) serves 640*384
    assert ServerConfig(backend="liveavatar", random_weights="tiny", size="688*368").validate().size == "640*384"
    assert ServerConfig(backend="liveavatar", random_weights="tiny", size="704*384").validate().size == "704*384"
    assert ServerConfig(backend="preview", size="688*368").validate().size == "688*368"  # any multiple of 16
    with pytest.raises(ConfigError, match="size 64\\*64"):
        ServerConfig(backend="liveavatar", random_weights="tiny", size="64*64").validate()
