"""Causal VAE: per-session streaming decode equals diffusers' whole-clip decode, sessions never mix."""

from __future__ import annotations

import pytest
import torch

from liveavatar.models.vae import StreamingDecoder, VAEConfig, WanVAE, build_vae


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    model = build_vae(VAEConfig.tiny())
    with torch.no_grad():
        for p in model.parameters():  # random, not the identity-ish default init
            p.normal_(0.0, 0.2)
    return WanVAE(model)


def random_latents(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(16, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


def test_one_latent_at_a_time_equals_full_decode(vae: WanVAE) -> None:
    z = random_latents(4, seed=1)
    full = vae.model.decode(vae.denormalize(z).unsqueeze(0)).sample[0]

    state = vae.new_stream()
    parts = [vae.decode_stream(state, z[:, i : i + 1]) for i in range(4)]

    assert [p.shape[1] for p in parts] == [1, 4, 4, 4]
    assert torch.equal(torch.cat(parts, dim=1), full)
    assert full.shape == (3, 13, 32, 48)


def test_any_chunking_after_the_first_latent_gives_the_same_frames(vae: WanVAE) -> None:
    z = random_latents(7, seed=6)
    state = vae.new_stream()
    per_latent = torch.cat([vae.decode_stream(state, z[:, i : i + 1]) for i in range(7)], dim=1)
    for chunk in (2, 3, 6):
        blocked = WanVAE(vae.model, decode_chunk=chunk).decode(z)
        assert blocked.shape == per_latent.shape == (3, 25, 32, 48)
        torch.testing.assert_close(blocked, per_latent, rtol=0, atol=1e-5)  # the causal cache makes chunks exact


def test_interleaved_sessions_equal_each_alone(vae: WanVAE) -> None:
    za, zb = random_latents(3, seed=2), random_latents(3, seed=3)
    one_at_a_time = WanVAE(vae.model, decode_chunk=1)  # the same calls as below, so bit-equal
    alone_a = one_at_a_time.decode(za)
    alone_b = one_at_a_time.decode(zb)

    sa, sb = vae.new_stream(), vae.new_stream()
    out_a, out_b = [], []
    for i in range(3):
        out_a.append(vae.decode_stream(sa, za[:, i : i + 1]))
        out_b.append(vae.decode_stream(sb, zb[:, i : i + 1]))

    assert torch.equal(torch.cat(out_a, 1), alone_a)
    assert torch.equal(torch.cat(out_b, 1), alone_b)
    assert sa.nbytes() > 0


def test_warmed_decoder_gives_four_frames_per_latent_and_continues_the_warm_up(vae: WanVAE) -> None:
    motion, block = random_latents(9, seed=4), random_latents(3, seed=5)
    decoder = StreamingDecoder(vae)
    state = decoder.new_state(motion)
    out = decoder.decode(state, block)

    assert out.shape[1] == 12  # the block's first latent is not the stream's first
    assert state.latents_decoded == StreamingDecoder.warm_up_latents + 3
    reference = vae.decode(torch.cat([motion[:, : StreamingDecoder.warm_up_latents], block], dim=1))
    assert torch.equal(out, reference[:, -12:])


def test_encode_matches_diffusers_and_normalises_latents(vae: WanVAE) -> None:
    video = torch.rand(3, 9, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    z = vae.encode(video)
    mu = vae.model.encode(video.unsqueeze(0)).latent_dist.mode()[0]

    assert z.shape == (16, 3, 4, 6)
    mean = torch.tensor(vae.model.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(-1, 1, 1, 1)
    assert torch.equal(z, (mu - mean) / std)
    assert vae.encode(video[:, :1]).shape == (16, 1, 4, 6)


def test_motion_video_of_73_frames_gives_19_latents(vae: WanVAE) -> None:
    frame = torch.rand(3, 1, 8, 8) * 2 - 1
    assert vae.encode(frame.expand(-1, 73, -1, -1)).shape == (16, 19, 1, 1)
    with pytest.raises(ValueError, match="1\\+4k"):
        vae.encode(frame.expand(-1, 4, -1, -1))


def test_a_compiled_decoder_traces_one_variant_in_the_warm_up_so_blocks_never_recompile() -> None:
    """A stream's decoder calls meet three cache variants (empty caches, one-frame caches, steady);
    the first two run eagerly while the session opens, so the compiled decoder holds the steady graph
    only. Each further variant was a whole-decoder recompile in every process's first streams (on an
    H200, seconds of each start-up): one came from caches that kept the batch stride of the longer
    input they were sliced from. A second session and later blocks add no graph."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from liveavatar.acceleration.accelerate import compile_vae

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    decoder = StreamingDecoder(WanVAE(build_vae(VAEConfig.tiny())))
    eager = StreamingDecoder(WanVAE(copy.deepcopy(decoder.vae.model)))  # compiled in place below
    compile_vae(decoder, backend="eager")  # dynamo's guards without inductor's compile time
    try:
        for session in range(2):
            motion = random_latents(9, seed=6 + session)
            state, reference = decoder.new_state(motion), eager.new_state(motion)
            if session == 0:
                assert counters["stats"]["unique_graphs"] == 1  # the steady chunk of the warm-up
            for k in range(3):
                latents = random_latents(3, seed=7 + k)
                torch.testing.assert_close(decoder.decode(state, latents), eager.decode(reference, latents))
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"]
        cached = [t for t in state.feat_cache if isinstance(t, torch.Tensor)]
        assert cached and all(t.is_contiguous() and t.stride()[0] == t[0].numel() for t in cached)
    finally:
        torch._dynamo.reset()
