"""`--enable_online_decode` on or off, and `--offload_model`, give the same video with the tiny DiT.

Online decode turns each block into frames as soon as it is denoised; without it every block's
latents are made first and decoded afterwards (the original's default). The causal decode is
chunk-exact, so both must produce the same frames. Offloading only moves modules between devices.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from liveavatar.generator import AudioWindow, AvatarSpec, Size
from liveavatar.media_io import decode_audio, load_image
from liveavatar.offline.render import RenderSegment, render

ASSETS = Path(__file__).parent / "assets"
PORTRAIT = Path(__file__).parents[1] / "liveavatar" / "assets" / "portrait_astronaut_512.png"


def frames_of(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_deferred_decode_gives_the_same_video_as_online_decode(tiny_liveavatar, one_torch_thread, tmp_path) -> None:
    audio = decode_audio(ASSETS / "speech_en_16k_b.wav").samples[:16000]  # 1 s: 25 frames, 3 blocks
    segment = RenderSegment(AvatarSpec(load_image(PORTRAIT), "a woman talking", seed=3), audio)
    size = Size(128, 128)
    online = render(tiny_liveavatar, [segment], size, tmp_path / "online.mp4", progress=False, online_decode=True)
    deferred = render(tiny_liveavatar, [segment], size, tmp_path / "deferred.mp4", progress=False, online_decode=False)
    assert online.frames == deferred.frames == 25
    a, b = frames_of(online.output), frames_of(deferred.output)
    assert a.shape == b.shape and np.array_equal(a, b)


def test_offload_places_only_the_stage_in_use(tiny_liveavatar, one_torch_thread) -> None:
    gen = tiny_liveavatar
    spec = AvatarSpec(load_image(PORTRAIT), "a woman talking", seed=1)
    state = gen.open(spec, Size(128, 128))
    silent = AudioWindow(np.zeros(gen.audio_samples_per_block, np.float32))
    reference = gen.step(state, silent)
    gen.close(state)
    try:
        gen.offload_model = True
        state = gen.open(spec, Size(128, 128))
        assert gen.resident == "vae"  # the decoder warm-up ran the VAE last
        latents = gen.step_latents(state, silent)
        assert gen.resident == "dit"
        frames = gen.decode_latents(state, latents)
        assert gen.resident == "vae"
        assert np.array_equal(frames, reference)  # moving stages changes nothing in the result
        gen.close(state)
    finally:
        gen.offload_model = False
        gen.resident = None


def test_the_standard_preset_size_is_an_area_limit_for_the_dit() -> None:
    from liveavatar.offline.generate import dit_size
    from liveavatar.offline.inputs import InputError

    assert dit_size(Size(688, 368)) == Size(640, 384)  # the original's 688*368 preset
    assert dit_size(Size(704, 384)) == Size(704, 384)
    with pytest.raises(InputError, match="--size"):
        dit_size(Size(64, 64))
