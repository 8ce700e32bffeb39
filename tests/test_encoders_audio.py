"""wav2vec2 features: the reference's 50 -> 30 Hz -> 25 fps arithmetic, and the live per-block variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liveavatar.models.audio_features import (
    AudioFeatureExtractor,
    AudioStats,
    bucket_to_video_frames,
    interpolate_to_30hz,
    num_clips,
    num_wav2vec_frames,
    video_frame_indices,
    wav2vec_positions,
)
from liveavatar.models.random_weights import tiny_wav2vec2


@pytest.fixture(scope="module")
def extractor() -> AudioFeatureExtractor:
    return AudioFeatureExtractor(tiny_wav2vec2(hidden_size=16, seed=0))


def test_whole_file_features_follow_the_reference_lengths(extractor: AudioFeatureExtractor) -> None:
    samples = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1
    feats = extractor.encode_file(samples)

    t = num_wav2vec_frames(samples.size)
    assert t == (48000 - 400) // 320 + 1 == 149
    t30 = int(t / 50 * 30)
    assert t30 == 89
    nr = num_clips(t30)
    assert nr == int(89 / (48 * 1.2)) + 1 == 2
    assert feats.shape == (25, 16, 48 * nr)
    assert feats.dtype == torch.float32

    hidden = extractor.hidden_states(extractor.normalize(samples))
    assert hidden.shape == (25, 149, 16)
    f30 = interpolate_to_30hz(hidden)
    idx = video_frame_indices(96, int(np.ceil(96 / 25 * 30)))
    for k in (0, 1, 5, 60):
        assert torch.equal(feats[:, :, k], f30[:, idx[k]])
    # Frames past the audio (30 Hz index >= T') are zero-filled, as the reference pads the last clip.
    assert idx[74] == 89 and torch.count_nonzero(feats[:, :, 74:]) == 0


def test_30hz_interpolation_uses_align_corners() -> None:
    hidden = torch.arange(10, dtype=torch.float32).view(1, 10, 1)
    out = interpolate_to_30hz(hidden)
    assert out.shape == (1, 6, 1)  # int(10 / 50 * 30)
    expected = torch.tensor([j * 9 / 5 for j in range(6)])
    torch.testing.assert_close(out[0, :, 0], expected)


def test_video_frame_indices_are_round_30k_over_25() -> None:
    idx = video_frame_indices(12, 100)
    assert idx.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13]
    assert video_frame_indices(12, 5).max() == 4


def test_bucketing_zero_fills_beyond_the_audio() -> None:
    feats = torch.ones(25, 10, 4)  # 10 frames at 30 Hz
    out = bucket_to_video_frames(feats)
    assert out.shape == (25, 4, 48)
    assert out[:, :, :8].eq(1).all() and out[:, :, 8:].eq(0).all()  # round(1.2·8) = 10 is past T'


def test_live_positions_are_the_reference_ones_without_its_length_dependent_drift() -> None:
    # Reference for a 60 s file: 30 Hz index j sits at 50 Hz position j·(T-1)/(T'-1); live uses 5/3.
    t = num_wav2vec_frames(16000 * 60)
    t30 = int(t / 50 * 30)
    j = video_frame_indices(1500, 1800)[1200:1212]
    ref = j * (t - 1) / (t30 - 1)
    live = wav2vec_positions(1200, 12)
    np.testing.assert_allclose(live, j * 5 / 3)
    np.testing.assert_allclose(ref - live, j * ((t - 1) / (t30 - 1) - 5 / 3))
    assert np.abs(ref - live).max() < 1.1  # about one 20 ms frame after 48 s


def test_block_features_have_12_columns_and_use_the_context(extractor: AudioFeatureExtractor) -> None:
    rng = np.random.default_rng(1)
    window = rng.standard_normal(7680).astype(np.float32) * 0.1
    context = rng.standard_normal(16000).astype(np.float32) * 0.1

    cold = extractor.block_features(window, np.zeros(0, np.float32), block_index=0)
    warm = extractor.block_features(window, context, block_index=3)
    assert cold.shape == warm.shape == (25, 16, 12)
    assert torch.isfinite(warm).all()
    assert not torch.allclose(cold, warm)

    # A column at an integral 50 Hz position is exactly that hidden state of the span.
    ctx = context[context.size % 320 :]
    span = np.concatenate([ctx, window])
    hidden = extractor.hidden_states(extractor.normalize(span, float(span.mean()), float(span.var()))).float()
    start = 3 * 24 - ctx.size // 320
    pos = wav2vec_positions(36, 12) - start
    k = int(np.flatnonzero(pos == np.round(pos))[0])
    torch.testing.assert_close(warm[:, :, k], hidden[:, int(pos[k])])


def test_running_audio_statistics_equal_those_of_the_whole_stream() -> None:
    rng = np.random.default_rng(2)
    chunks = [rng.standard_normal(n).astype(np.float32) * s for n, s in ((100, 0.1), (7680, 0.5), (7, 2.0))]
    stats = AudioStats()
    for c in chunks:
        stats.update(c)
    whole = np.concatenate(chunks).astype(np.float64)
    assert stats.count == whole.size
    assert stats.mean == pytest.approx(whole.mean(), rel=1e-9, abs=1e-12)
    assert stats.var == pytest.approx(whole.var(), rel=1e-9)


def test_near_silence_is_not_blown_up_to_unit_variance(extractor: AudioFeatureExtractor) -> None:
    hiss = np.random.default_rng(3).standard_normal(7680).astype(np.float32) * 1e-4
    stats = AudioStats()
    extractor.block_features(hiss, np.zeros(0, np.float32), 0, stats)
    normalized = extractor.normalize(hiss, stats.mean, max(stats.var, extractor.min_live_std**2))
    assert normalized.std() < 0.02
