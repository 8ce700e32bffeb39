"""Streaming with the 12-frame KV ring is exact: it equals attention over the explicit time-ordered
history window, also after the ring has wrapped and across the adaptive-sink prefill."""

import torch

from liveavatar.models.config import DiTConfig
from liveavatar.models.rope import sink_ref_frame
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.streaming.dit import RING_FRAMES, StreamingDiT
from liveavatar.streaming.sampler import FlowMatchEuler

LATENT = 16  # latent 16x16 -> 64 tokens per frame
BLOCKS = 6  # 18 frames: the ring (12) wraps, and the adaptive sink re-prefills at frame 12


class FullHistory:
    """Keeps every block's K/V in time order and returns the last <= 12 frames by explicit slicing,
    followed by the condition tokens (the order the original attends in)."""

    def __init__(self, frame_tokens: int):
        self.frame_tokens = frame_tokens
        self.k: dict[int, list[torch.Tensor]] = {}
        self.v: dict[int, list[torch.Tensor]] = {}
        self.frame_start = 0

    def update(self, layer, k, v, cond_k, cond_v):
        ks, vs = self.k.setdefault(layer, []), self.v.setdefault(layer, [])
        assert sum(t.shape[1] for t in ks) == self.frame_start * self.frame_tokens
        ks.append(k)
        vs.append(v)
        first = max(0, self.frame_start + 3 - RING_FRAMES) * self.frame_tokens
        keys, values = torch.cat(ks, dim=1)[:, first:], torch.cat(vs, dim=1)[:, first:]
        return torch.cat([keys, cond_k], dim=1), torch.cat([values, cond_v], dim=1)


def _inputs(cfg: DiTConfig, seed: int):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(16, 1, LATENT, LATENT, generator=g)
    motion = torch.randn(16, 19, LATENT, LATENT, generator=g)
    text = torch.randn(5, cfg.text_dim, generator=g)
    audio = torch.randn(BLOCKS, 25, cfg.audio_dim, 12, generator=g)
    noise = torch.randn(BLOCKS, 16, 3, LATENT, LATENT, generator=g)
    return ref, motion, text, audio, noise


def test_ring_streaming_equals_explicit_window_attention_after_wrap():
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    dit = LiveAvatarDiT(cfg).eval()
    ref, motion, text, audio, noise = _inputs(cfg, 1)
    draws = [4 + (7 * i) % 27 for i in range(BLOCKS * 4)]

    stream = StreamingDiT(dit)
    state = stream.new_state(ref, motion, text, seed=3)
    state.sink_shift_draws = iter(draws)
    streamed = [stream.step(state, audio[b], noise=noise[b]) for b in range(BLOCKS)]
    assert state.prefills == 2

    # Independent loop: explicit history, own prefills, own adaptive-sink replacement at frame 12.
    sampler = FlowMatchEuler(4)
    histories = [FullHistory(LATENT * LATENT // 4) for _ in range(4)]
    context = dit.embed_text(text)
    cond = dit.prefill(ref, motion, context)
    draw = iter(draws)
    first_frame = None
    for b in range(BLOCKS):
        f0 = 3 * b
        if f0 == 12:
            cond = dit.prefill(first_frame, motion, context)
        emb = dit.encode_audio(audio[b])
        x = noise[b]
        for s in range(4):
            histories[s].frame_start = f0
            v = dit(x, sampler.timesteps[s], context, emb, f0, cond, sink_ref_frame(f0, next(draw)), histories[s])
            x = sampler.step(s, x, v)
        if b == 0:
            first_frame = x[:, :1]
        torch.testing.assert_close(streamed[b], x, rtol=1e-5, atol=1e-5)


def test_ring_overwrites_the_oldest_block_when_it_wraps():
    cfg = DiTConfig.tiny(num_layers=2)
    dit = LiveAvatarDiT(cfg).eval()
    ref, motion, text, audio, noise = _inputs(cfg, 2)
    stream = StreamingDiT(dit)
    state = stream.new_state(ref, motion, text, seed=0)
    ring = state.branches[0].rings[0]
    block = 3 * ring.frame_tokens
    for b in range(4):
        stream.step(state, audio[b], noise=noise[b])
    before = ring.history(0)[0].clone()
    stream.step(state, audio[4], noise=noise[4])  # frames 12..14 go to the slots of frames 0..2
    after = ring.history(0)[0]
    assert after.shape[1] == RING_FRAMES * ring.frame_tokens
    assert ring.k[0].shape[1] == ring.cond_tokens + RING_FRAMES * ring.frame_tokens
    assert not torch.equal(after[:, :block], before[:, :block])
    assert torch.equal(after[:, block:], before[:, block:])
