"""The capture-ready DiT forward: the steady-state step a CUDA graph replays gives what the eager
forward gives. On the CPU the graph's function runs directly (device write slots, no per-block Python
ints); on a GPU the captured graphs themselves are compared with eager streaming."""

from __future__ import annotations

import pytest
import torch

from liveavatar.models.config import DiTConfig
from liveavatar.models.rope import sink_ref_frame
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.streaming.dit import StreamingDiT, _graphed_forward

LATENT = 8


def _inputs(cfg: DiTConfig, blocks: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(16, 1, LATENT, LATENT, generator=g)
    motion = torch.randn(16, 19, LATENT, LATENT, generator=g)
    text = torch.randn(5, cfg.text_dim, generator=g)
    audio = [torch.randn(cfg.audio_layers, cfg.audio_dim, 12, generator=g) for _ in range(blocks)]
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return move(ref), move(motion), move(text), [move(a) for a in audio]


def test_graph_function_equals_the_eager_forward_in_the_steady_state(one_torch_thread):
    """Blocks 4..7 write the four different ring slots; the graph's device slots must match each."""
    torch.manual_seed(0)
    cfg = DiTConfig.tiny(num_layers=2)
    stream = StreamingDiT(LiveAvatarDiT(cfg).eval())
    ref, motion, text, audio = _inputs(cfg, 8, "cpu", torch.float32)
    state = stream.new_state(ref, motion, text, seed=1)
    for b in range(4):  # fill the ring: block 3 (frames 9..11) completes it
        stream.step(state, audio[b])
    hp = wp = LATENT // 2
    br = state.branches[0]
    for b in range(4, 8):
        block = stream.begin_block(state, audio[b])
        f0, ring = block.frame_start, br.rings[0]
        ref_frame = sink_ref_frame(f0, 7)
        saved = [(k.clone(), v.clone()) for k, v in zip(ring.k, ring.v, strict=True)]
        eager = stream.dit(
            block.latents, stream.sampler.timesteps[0], br.context, block.audio, f0, br.cond_kv, ref_frame, ring.at(f0)
        )
        after_eager = [k.clone() for k in ring.k]
        for (k, v), (k0, v0) in zip(zip(ring.k, ring.v, strict=True), saved, strict=True):
            k.copy_(k0)
            v.copy_(v0)
        factors, cond_factors = stream.dit.rope_tables(f0, 3, hp, wp, ref_frame)
        start = ring.cond_tokens + ring.slot_offset(f0)
        slots = torch.arange(start, start + 3 * ring.frame_tokens)
        t = torch.as_tensor(stream.sampler.timesteps[0], dtype=torch.float32).reshape(1)
        graphed = _graphed_forward(
            stream.dit,
            block.latents.contiguous(),
            t,
            br.context,
            block.audio.tokens,
            block.audio.global_emb,
            factors,
            cond_factors,
            br.cond_kv,
            ring,
            slots,
        )
        assert torch.equal(graphed, eager), f"block {b}"
        assert all(torch.equal(k, k2) for k, k2 in zip(ring.k, after_eager, strict=True)), f"block {b}"
        written = slice(start, start + 3 * ring.frame_tokens)
        assert not torch.equal(after_eager[0][:, written], saved[0][0][:, written]), "the block must be written"
        for s in range(4):  # finish the block normally so the next one starts from a real stream
            block.latents = stream.sampler.step(s, block.latents, stream.denoise(state, block, s))
        stream.finish_block(state, block)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here)")
def test_cuda_graph_streaming_matches_eager_streaming_across_a_switch():
    torch.manual_seed(0)
    cfg = DiTConfig.tiny(num_layers=2)
    dit = LiveAvatarDiT(cfg).eval().to("cuda", torch.bfloat16)
    ref, motion, text, audio = _inputs(cfg, 9, "cuda", torch.bfloat16)
    eager, graphed = StreamingDiT(dit), StreamingDiT(dit, cuda_graphs=True)
    a, b = eager.new_state(ref, motion, text, seed=5), graphed.new_state(ref, motion, text, seed=5)
    new_ref = torch.randn_like(ref)
    for i in range(9):
        if i == 6:  # a switch: the prefill rewrites the condition cache in place, the graphs stay valid
            eager.set_avatar(a, ref_latent=new_ref)
            graphed.set_avatar(b, ref_latent=new_ref)
        out_a, out_b = eager.step(a, audio[i]), graphed.step(b, audio[i])
        torch.testing.assert_close(out_b.float(), out_a.float(), rtol=0, atol=2e-2)
    assert graphed.cuda_graphs, "capture must not have fallen back to eager"
    assert all(r.graph is not None and len(r.graph.graphs) == 1 for r in b.branches[0].rings)
