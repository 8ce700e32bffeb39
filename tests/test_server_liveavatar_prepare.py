"""A new avatar is encoded off the worker thread: `prepare` fills the generator's content caches on a
helper thread before `open`/`switch`, so the thread that steps every session only looks them up."""

from __future__ import annotations

import threading

import numpy as np

from liveavatar.generator import AvatarSpec, Size
from liveavatar.media_io import default_portrait_path, load_image


def test_prepare_fills_the_caches_that_open_and_switch_use(tiny_liveavatar, one_torch_thread) -> None:
    gen = tiny_liveavatar
    size = Size(128, 128)
    image = np.ascontiguousarray(load_image(default_portrait_path())[::-1])  # an avatar no other test used
    spec = AvatarSpec(image, "a portrait seen upside down, talking", seed=5)
    calls: list[str] = []
    encode, text = gen.pipeline.vae.encode, gen.pipeline.text_encoder.encode_prompt

    def spy(fn, name):
        def wrapped(*a, **k):
            calls.append(f"{name}@{threading.current_thread().name}")
            return fn(*a, **k)

        return wrapped

    gen.pipeline.vae.encode = spy(encode, "vae")
    gen.pipeline.text_encoder.encode_prompt = spy(text, "text")
    try:
        helper = threading.Thread(target=gen.prepare, args=(spec, size), name="prepare")
        helper.start()
        helper.join()
        assert sorted(c.split("@")[0] for c in calls) == ["text", "vae", "vae"]  # reference + motion
        assert all(c.endswith("@prepare") for c in calls)
        calls.clear()
        state = gen.open(spec, size)  # on "the worker": nothing left to encode
        gen.close(state)
        assert calls == []
    finally:
        gen.pipeline.vae.encode, gen.pipeline.text_encoder.encode_prompt = encode, text
