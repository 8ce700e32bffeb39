"""Compiled engines give the eager outputs: the split-block compile of the tiny DiT (with the fused
RoPE and with FP8), and regional compilation of a generic module. On the CPU the `aot_eager` backend
is used: it runs the same dynamo capture and AOT autograd graphs as inductor, without spending a
minute of C++ compilation per graph on the 2-core CI machine (inductor itself is exercised on GPU by
`liveavatar bench --engine compile`)."""

import copy

import pytest
import torch
import torch.nn as nn

from engines.compile import CUDAGraphRunner, compile_regions
from liveavatar.acceleration import accelerate as accel
from liveavatar.models import transformer_liveavatar
from liveavatar.models.config import DiTConfig
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.streaming.dit import StreamingDiT

BACKEND = "aot_eager"


def _stream_blocks(dit, blocks=2):
    g = torch.Generator().manual_seed(1)
    stream = StreamingDiT(dit, 4)
    state = stream.new_state(
        torch.randn(16, 1, 8, 8, generator=g),
        torch.randn(16, 19, 8, 8, generator=g),
        torch.randn(5, dit.config.text_dim, generator=g),
        seed=3,
    )
    audio = torch.randn(25, dit.config.audio_dim, 12, generator=g)
    return [stream.step(state, audio) for _ in range(blocks)]


@pytest.fixture
def restore_rope():
    original = transformer_liveavatar.apply_rope
    yield
    transformer_liveavatar.apply_rope = original


def test_compiled_dit_matches_eager(restore_rope):
    torch.manual_seed(0)
    eager = LiveAvatarDiT(DiTConfig.tiny()).eval()
    compiled = accel.compile_dit(copy.deepcopy(eager), backend=BACKEND)
    accel.compile_rope(backend=BACKEND)
    installed = transformer_liveavatar.apply_rope
    accel.compile_rope(backend=BACKEND)  # a second GPU set asks again: the kernel stays the same
    assert transformer_liveavatar.apply_rope is installed
    for got, want in zip(_stream_blocks(compiled), _stream_blocks(eager), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_fp8_dit_matches_eager_fp8():
    torch.manual_seed(0)
    eager = LiveAvatarDiT(DiTConfig.tiny()).eval()
    names = accel.apply_fp8(eager, emulate=True)
    assert names and not any(s in n for n in names for s in accel.FP8_SKIP)
    compiled = accel.compile_dit(copy.deepcopy(eager), backend=BACKEND)
    for got, want in zip(_stream_blocks(compiled, 1), _stream_blocks(eager, 1), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_regional_compile_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)])
    x = torch.randn(4, 16)
    want = model(x)
    compile_regions(model, [nn.Sequential], backend=BACKEND)
    torch.testing.assert_close(model(x), want)
    with pytest.raises(ValueError):
        compile_regions(nn.Linear(2, 2), [nn.Conv1d], backend=BACKEND)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_runner_replays_with_state_in_place():
    cache = torch.zeros(8, 4, device="cuda")

    def step(x, slot_mask, state):
        state.copy_(torch.where(slot_mask[:, None], x.expand_as(state), state))
        return state.sum(0) * 2

    runner = CUDAGraphRunner(step, static_args={2})
    for i in range(3):
        mask = torch.arange(8, device="cuda") == i
        x = torch.full((1, 4), float(i + 1), device="cuda")
        out = runner(x, mask, cache)
        torch.testing.assert_close(out, cache.sum(0) * 2)
    assert len(runner.graphs) == 1
