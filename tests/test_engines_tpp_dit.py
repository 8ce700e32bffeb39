"""The tiny LiveAvatar DiT streamed through the timestep-forcing pipeline on 2 and 4 gloo ranks gives
exactly the latents of `StreamingDiT.step` in one process, including the adaptive-sink refresh that
needs block 0's final frame on every rank before block 4."""

import pytest
import torch

from engines.distributed import spawn
from engines.tpp import PipelinePlan, run_rank, run_sequential
from liveavatar.acceleration.accelerate import BlockInputs, StreamStages, sink_feedback
from liveavatar.models.config import DiTConfig
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.streaming.dit import StreamingDiT

LATENT_HW = (8, 8)
NUM_BLOCKS = 5  # block 4 is the first after the sink refresh
STEPS = 4


def _build() -> tuple[StreamingDiT, BlockInputs]:
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    dit = LiveAvatarDiT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    h, w = LATENT_HW
    inputs = BlockInputs(
        ref_latent=torch.randn(16, 1, h, w, generator=g),
        motion_latents=torch.randn(16, 19, h, w, generator=g),
        text_context=torch.randn(7, cfg.text_dim, generator=g),
        audio_feats=[torch.randn(25, cfg.audio_dim, 12, generator=g) for _ in range(3)],
        seed=5,
    )
    return StreamingDiT(dit, STEPS), inputs


def _rank_main(rank, world_size, decode_cost=0.0):
    stream, inputs = _build()
    layers = stream.dit.config.num_layers
    plan = PipelinePlan(STEPS, world_size, decode_cost=decode_cost, parts=layers if decode_cost else 1)
    stages = StreamStages(stream, inputs)
    feedback = sink_feedback(*LATENT_HW, stream.dit.dtype)
    hidden = (1, 3 * (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2), stream.dit.config.dim)
    report = run_rank(
        plan,
        rank,
        stages,
        NUM_BLOCKS,
        (16, 3, *LATENT_HW),
        stream.dit.dtype,
        torch.device("cpu"),
        feedback,
        hidden_shape=hidden,
    )
    return report.outputs, stages.state.prefills, plan.spans_of(rank)


def _reference() -> list[torch.Tensor]:
    stream, inputs = _build()
    state = stream.new_state(inputs.ref_latent, inputs.motion_latents, inputs.text_context, inputs.seed)
    return [stream.step(state, inputs.audio_feats[b % len(inputs.audio_feats)]) for b in range(NUM_BLOCKS)]


def test_stages_run_sequentially_equal_streaming_step():
    stream, inputs = _build()
    report = run_sequential(
        StreamStages(stream, inputs), NUM_BLOCKS, STEPS, sink_feedback(*LATENT_HW, stream.dit.dtype)
    )
    for got, want in zip(report.outputs, _reference(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_dit_pipeline_on_gloo_ranks_matches_single_process(world_size):
    results = spawn(world_size, _rank_main, backend="gloo")
    outputs, _, _ = results[-1]
    assert all(prefills == 2 for _, prefills, _ in results), "every rank must redo the prefill once (adaptive sink)"
    for got, want in zip(outputs, _reference(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_balanced_pipeline_cutting_steps_between_layers_matches_single_process():
    """3 ranks, decode counted as 1.5 steps: boundaries fall inside steps, so the token stream after a
    layer and the step's input latents cross ranks; the result must still be bit-identical."""
    results = spawn(3, _rank_main, args=(1.5,), backend="gloo")
    spans = [sp for _, _, rank_spans in results for sp in rank_spans]
    assert any(not sp.whole for sp in spans), "the plan should cut at least one step"
    outputs, _, _ = results[-1]
    for got, want in zip(outputs, _reference(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
