"""Per-session state: sessions do not bleed into each other, seeds decide the output, the adaptive
sink replaces the reference after one clip, and set_avatar switches at a block boundary."""

import pytest
import torch

from liveavatar.models.config import DiTConfig
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.streaming.dit import RING_FRAMES, StreamingDiT

LATENT = 16


@pytest.fixture(scope="module")
def stream():
    torch.manual_seed(0)
    return StreamingDiT(LiveAvatarDiT(DiTConfig.tiny()).eval())


def _avatar(cfg: DiTConfig, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(16, 1, LATENT, LATENT, generator=g),
        torch.randn(16, 19, LATENT, LATENT, generator=g),
        torch.randn(6, cfg.text_dim, generator=g),
    )


def _audio(cfg: DiTConfig, blocks: int, seed: int = 9):
    return torch.randn(blocks, 25, cfg.audio_dim, 12, generator=torch.Generator().manual_seed(seed))


def test_interleaved_sessions_equal_each_session_alone(stream):
    cfg = stream.dit.config
    audio_a, audio_b = _audio(cfg, 3, 1), _audio(cfg, 3, 2)
    alone_a = [stream.step(s, a) for s in [stream.new_state(*_avatar(cfg, 1), seed=11)] for a in audio_a]
    alone_b = [stream.step(s, a) for s in [stream.new_state(*_avatar(cfg, 2), seed=22)] for a in audio_b]
    state_a = stream.new_state(*_avatar(cfg, 1), seed=11)
    state_b = stream.new_state(*_avatar(cfg, 2), seed=22)
    for i in range(3):
        assert torch.equal(stream.step(state_a, audio_a[i]), alone_a[i])
        assert torch.equal(stream.step(state_b, audio_b[i]), alone_b[i])


def test_same_seed_gives_same_video_and_different_seed_differs(stream):
    cfg = stream.dit.config
    audio = _audio(cfg, 2)

    def run(seed):
        state = stream.new_state(*_avatar(cfg, 1), seed=seed)
        return torch.cat([stream.step(state, a) for a in audio], dim=1)

    first = run(5)
    assert torch.equal(first, run(5))
    assert not torch.allclose(first, run(6))


def test_seed_also_fixes_the_sink_shift_draws(stream):
    cfg = stream.dit.config
    a, b = stream.new_state(*_avatar(cfg, 1), seed=5), stream.new_state(*_avatar(cfg, 1), seed=5)
    draws = [a.draw_sink_shift() for _ in range(200)]
    assert draws == [b.draw_sink_shift() for _ in range(200)]
    assert set(draws) == set(range(4, 31))


def test_adaptive_sink_replaces_reference_after_first_clip_once(stream):
    cfg = stream.dit.config
    state = stream.new_state(*_avatar(cfg, 3), seed=1)
    original_ref = state.ref_latent.clone()
    outputs = [stream.step(state, a) for a in _audio(cfg, 4)]
    assert state.prefills == 1 and torch.equal(state.ref_latent, original_ref)
    stream.step(state, _audio(cfg, 1)[0])  # first block of the second clip
    assert state.prefills == 2
    assert torch.equal(state.ref_latent, outputs[0][:, :1])
    new_cond = stream.dit.prefill(outputs[0][:, :1], state.motion_latents, state.branches[0].context)
    for (k, v), (k2, v2) in zip(state.branches[0].cond_kv, new_cond, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    for a in _audio(cfg, 5):
        stream.step(state, a)
    assert state.prefills == 2 and state.frame == 30


def test_set_avatar_takes_effect_at_the_next_block_and_keeps_the_stream(stream):
    cfg = stream.dit.config
    audio = _audio(cfg, 4)
    plain = stream.new_state(*_avatar(cfg, 1), seed=4)
    switched = stream.new_state(*_avatar(cfg, 1), seed=4)
    for i in range(2):
        assert torch.equal(stream.step(plain, audio[i]), stream.step(switched, audio[i]))
    ring_before = switched.branches[0].rings[0].history(0)[0][:, : 6 * 64].clone()
    new_ref, _, new_text = _avatar(cfg, 2)
    stream.set_avatar(switched, ref_latent=new_ref, text_context=new_text)
    assert switched.frame == 6 and switched.prefills == 1  # nothing happens before the next block
    out_plain, out_switched = stream.step(plain, audio[2]), stream.step(switched, audio[2])
    assert switched.prefills == 2 and switched.frame == plain.frame == 9
    assert not torch.allclose(out_plain, out_switched)
    assert torch.equal(switched.branches[0].rings[0].history(0)[0][:, : 6 * 64], ring_before)
    expected = stream.dit.prefill(new_ref, switched.motion_latents, stream.dit.embed_text(new_text))
    assert torch.equal(switched.branches[0].cond_kv[0][0], expected[0][0])
    # The adaptive sink now counts from the switch (frame 6): replaced at frame 18, not 12.
    for a in _audio(cfg, 3, seed=3):
        stream.step(switched, a)
    assert switched.prefills == 2 and switched.frame == 18
    stream.step(switched, audio[3])
    assert switched.prefills == 3 and torch.equal(switched.ref_latent, out_switched[:, :1])


def test_state_memory_is_reported_for_admission_control(stream):
    cfg = stream.dit.config
    state = stream.new_state(*_avatar(cfg, 1), seed=0)
    empty = state.nbytes()
    stream.step(state, _audio(cfg, 1)[0])
    fsl = (LATENT // 2) ** 2
    cond_tokens = 5 * fsl // 2  # each step's buffer is [condition ; 12 frames]
    ring_bytes = 4 * cfg.num_layers * 2 * (RING_FRAMES * fsl + cond_tokens) * cfg.dim * 4
    assert sum(r.nbytes() for r in state.branches[0].rings) == ring_bytes
    assert empty < ring_bytes < state.nbytes() <= stream.state_nbytes(LATENT, LATENT)


def test_cfg_runs_a_separate_unconditional_branch(stream):
    cfg = stream.dit.config
    guided = StreamingDiT(stream.dit, guide_scale=3.0)
    ref, motion, text = _avatar(cfg, 1)
    audio = _audio(cfg, 1)[0]
    state = guided.new_state(ref, motion, text, seed=2)
    assert len(state.branches) == 2
    out = guided.step(state, audio)
    assert state.branches[1].rings[0].k[0] is not None
    assert not torch.allclose(out, stream.step(stream.new_state(ref, motion, text, seed=2), audio))


def test_bad_latent_shapes_are_rejected(stream):
    cfg = stream.dit.config
    ref, motion, text = _avatar(cfg, 1)
    with pytest.raises(ValueError, match="divisible by 8"):
        stream.new_state(ref[..., :12, :12], motion[..., :12, :12], text, seed=0)
    with pytest.raises(ValueError, match="ref_latent"):
        stream.new_state(ref[:, :, None], motion, text, seed=0)
    state = stream.new_state(ref, motion, text, seed=0)
    with pytest.raises(ValueError, match="audio_feats"):
        stream.step(state, _audio(cfg, 1)[0][..., :8])


def test_bf16_model_streams_in_bf16_close_to_fp32(stream):
    """The GPU dtype flow (bf16 weights, fp32 timestep/residual paths) runs and tracks the fp32 result."""
    cfg = stream.dit.config
    bf16 = LiveAvatarDiT(cfg).eval()
    bf16.load_state_dict(stream.dit.state_dict())
    bf16 = StreamingDiT(bf16.to(torch.bfloat16))
    ref, motion, text = _avatar(cfg, 1)
    audio = _audio(cfg, 2)
    s32, s16 = stream.new_state(ref, motion, text, seed=7), bf16.new_state(ref, motion, text, seed=7)
    for a in audio:
        noise = torch.randn(16, 3, LATENT, LATENT, generator=torch.Generator().manual_seed(int(a.sum().abs() * 100)))
        out32, out16 = stream.step(s32, a, noise=noise), bf16.step(s16, a, noise=noise)
        assert out16.dtype == torch.bfloat16 and s16.branches[0].rings[0].k[0].dtype == torch.bfloat16
        rel = ((out16.float() - out32).norm() / out32.norm()).item()
        assert rel < 0.05, rel
