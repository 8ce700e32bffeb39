"""LiveAvatarGenerator with tiny random weights: 12-frame uint8 blocks, seeded, switch at a block boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liveavatar.backends import create_generator
from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator, prepare_reference, to_uint8_frames
from liveavatar.generator import AudioWindow, AvatarSpec, Size

SIZE = Size(128, 128)


@pytest.fixture(scope="module")
def gen() -> LiveAvatarGenerator:
    # 5 motion frames instead of 73 keep the VAE work of a CPU test small (FramePack zero-fills).
    g = create_generator("liveavatar", random_weights="tiny", device="cpu", motion_frames=5)
    assert isinstance(g, LiveAvatarGenerator)
    return g


def portrait(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((96, 80, 3)) * 255).astype(np.uint8)


def window(index: int) -> AudioWindow:
    rng = np.random.default_rng(100 + index)
    samples = (rng.standard_normal(7680) * 0.1).astype(np.float32)
    context = (rng.standard_normal(3200) * 0.1).astype(np.float32) if index else np.zeros(0, np.float32)
    return AudioWindow(samples=samples, context=context, speech=True, index=index)


def test_blocks_are_12_uint8_frames_deterministic_per_seed_and_switch_at_the_boundary(
    gen: LiveAvatarGenerator,
) -> None:
    spec = AvatarSpec(image=portrait(0), prompt="a man speaks", seed=7)
    other = AvatarSpec(image=portrait(1), prompt="a woman talks", seed=7)

    a = gen.open(spec, SIZE)
    a0 = gen.step(a, window(0))
    a1 = gen.step(a, window(1))
    assert a0.shape == (12, SIZE.height, SIZE.width, 3) and a0.dtype == np.uint8
    assert a0.std() > 0

    b = gen.open(spec, SIZE)
    b0 = gen.step(b, window(0))
    gen.switch(b, other)
    b1 = gen.step(b, window(1))
    assert np.array_equal(a0, b0)  # same seed, same avatar, same audio: same pixels
    assert not np.array_equal(a1, b1)  # the switch takes effect at the next block
    assert b.spec is other and b.pending is None

    c = gen.open(AvatarSpec(image=portrait(0), prompt="a man speaks", seed=8), SIZE)
    assert not np.array_equal(gen.step(c, window(0)), a0)

    assert a.nbytes() > 0
    for s in (a, b, c):
        gen.close(s)
    assert a.nbytes() == 0
    with pytest.raises(RuntimeError, match="closed"):
        gen.step(a, window(2))


def test_avatar_latents_and_prompts_are_cached_by_content(gen: LiveAvatarGenerator) -> None:
    first = gen.avatar_latents(portrait(0), SIZE)
    again = gen.avatar_latents(portrait(0).copy(), SIZE)
    assert first is again
    assert first.ref_latent.shape == (16, 1, 16, 16)
    assert first.motion_latents.shape == (16, 2, 16, 16)  # 5 frames -> 1 + 1 latents
    assert gen.prompt_features("a man speaks") is gen.prompt_features("a man speaks")


def test_open_rejects_sizes_the_dit_cannot_make(gen: LiveAvatarGenerator) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        gen.open(AvatarSpec(image=portrait(0)), Size(144, 128))
    session = gen.open(AvatarSpec(image=portrait(0)), SIZE)
    with pytest.raises(ValueError, match="window has 100 samples, expected 7680"):
        gen.step(session, AudioWindow(samples=np.zeros(100, np.float32)))
    gen.close(session)


def test_reference_is_resized_on_the_short_side_then_centre_cropped() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 90:110] = 255  # a white bar in the middle
    ref = prepare_reference(image, width=128, height=64)
    assert ref.shape == (3, 1, 64, 128)
    assert ref.min() == -1 and ref.max() == 1
    assert ref[:, 0, :, 64].eq(1).all() and ref[:, 0, :, 0].eq(-1).all()

    tall = prepare_reference(np.full((300, 100, 3), 255, np.uint8), width=128, height=128)
    assert tall.shape == (3, 1, 128, 128) and tall.eq(1).all()  # no padding needed after the resize


def test_poster_is_the_portrait_framed_like_the_reference(gen: LiveAvatarGenerator) -> None:
    image = portrait(3)
    state = gen.open(AvatarSpec(image, "a person"), SIZE)
    poster = gen.poster(state)
    assert poster.shape == (128, 128, 3) and poster.dtype == np.uint8
    ref = prepare_reference(image, SIZE.width, SIZE.height)  # the conditioning image, in [-1, 1]
    pixels = torch.from_numpy(poster).permute(2, 0, 1).float().unsqueeze(1) / 255 * 2 - 1
    assert (pixels - ref).abs().max() < 1e-6
    gen.close(state)


def test_frames_convert_with_the_reference_rounding() -> None:
    video = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 6, 1, 1).expand(3, -1, -1, -1)
    frames = to_uint8_frames(video)
    assert frames.shape == (6, 1, 1, 3)
    assert frames[:, 0, 0, 0].tolist() == [0, 63, 127, 254, 255, 255]
