"""Audio tokens per block and RoPE positions follow the original's arithmetic (docs/model.md §3.5, §3.6)."""

import torch

from liveavatar.models.config import DiTConfig
from liveavatar.models.rope import apply_rope, cond_positions, motion_positions, rope_factors, sink_ref_frame
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT


def test_block_audio_goes_85_to_43_to_22_and_keeps_the_last_3():
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    dit = LiveAvatarDiT(cfg).eval()
    lengths = []
    enc = dit.casual_audio_encoder.encoder
    hooks = [
        m.register_forward_hook(lambda _m, inp, out: lengths.append((inp[0].shape[-1], out.shape[-1])))
        for m in (enc.conv1_local, enc.conv2, enc.conv3)
    ]
    feats = torch.randn(25, cfg.audio_dim, 12)
    with torch.no_grad():
        audio = dit.encode_audio(feats)
    for h in hooks:
        h.remove()
    # conv1 sees 73 replicated + 12 real frames; conv2/conv3 run for the 4 local groups and the global branch
    assert lengths[0] == (85, 85)
    assert set(lengths[1:]) == {(85, 43), (43, 22)}
    assert audio.tokens.shape == (3, cfg.num_audio_token + 1, cfg.dim)
    assert audio.global_emb.shape == (3, cfg.dim)
    # the 5th token of every frame is the learned padding token
    torch.testing.assert_close(audio.tokens[:, -1], enc.padding_tokens[0, 0].expand(3, -1))


def test_audio_encoder_is_causal_in_time():
    torch.manual_seed(1)
    cfg = DiTConfig.tiny()
    dit = LiveAvatarDiT(cfg).eval()
    feats = torch.randn(25, cfg.audio_dim, 12)
    later = feats.clone()
    later[..., 8:] += 1.0  # changes audio of latent frame 2 only (video frames 8..11)
    with torch.no_grad():
        a, b = dit.encode_audio(feats), dit.encode_audio(later)
    torch.testing.assert_close(a.tokens[:2], b.tokens[:2])
    assert not torch.allclose(a.tokens[2], b.tokens[2])


def test_motion_positions_match_spec_example():
    pos = motion_positions(24, 44)
    n1, n2 = 24 * 44, 12 * 22
    assert pos[:n1, 0].unique().tolist() == [-1]
    assert pos[n1 : n1 + n2, 0].unique().tolist() == [-3]
    rows_2x = pos[n1 : n1 + n2 : 22, 1].tolist()
    assert rows_2x == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
    assert pos[n1 + n2 :, 0].unique().tolist() == [-19, -14, -9, -4]
    assert len(cond_positions(24, 44)) == 2640  # 2.5 x 1056 tokens per frame


def test_sink_reference_sits_ahead_of_the_block_but_never_before_30():
    assert sink_ref_frame(0, 4) == 30
    assert sink_ref_frame(24, 4) == 30
    assert sink_ref_frame(27, 30) == 57


def test_rope_factors_are_fp16_rounded_and_negative_positions_conjugate():
    pos = torch.tensor([[5, 3, 7], [-5, -3, -7]])
    f = rope_factors(pos, 128)
    assert f.shape == (2, 64) and f.dtype == torch.complex128
    assert torch.equal(f.real, f.real.half().double()) and torch.equal(f.imag, f.imag.half().double())
    assert torch.equal(f[1], f[0].conj())
    # time pairs 0..21 use 10000^(-2j/44): pair 1 at t=5 rotates by 5 * 10000^(-1/22)
    angle = 5 * 10000 ** (-2 / 44)
    assert abs(f[0, 1].real.item() - torch.tensor(angle, dtype=torch.float64).cos().half().item()) == 0


def test_rope_rotates_interleaved_pairs_and_preserves_norm():
    x = torch.randn(1, 2, 3, 128)
    f = rope_factors(torch.tensor([[1, 2, 3], [0, 0, 0]]), 128)
    y = apply_rope(x, f)
    torch.testing.assert_close(y[:, 1], x[:, 1], rtol=0, atol=2e-3)  # position 0: identity up to fp16 factors
    pairs_x = x.reshape(1, 2, 3, 64, 2).norm(dim=-1)
    pairs_y = y.reshape(1, 2, 3, 64, 2).norm(dim=-1)
    torch.testing.assert_close(pairs_y, pairs_x, rtol=2e-3, atol=1e-4)
