"""A compiled streaming VAE decoder meets three cache variants and then no new one.

The variants are: the stream's first latent (empty caches), the chunk after it (one-frame caches), and
every later chunk. A fourth meant a recompile of the whole decoder in each process's first streams (on
an H200, seconds of every start-up); it came from cache tensors that kept the batch stride of the
longer input they were sliced from.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from liveavatar.acceleration.accelerate import compile_vae
from liveavatar.models.vae import StreamingDecoder, VAEConfig, WanVAE, build_vae


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_decoder_settles_after_three_variants_across_sessions(fresh_dynamo):
    torch.manual_seed(0)
    decoder = StreamingDecoder(WanVAE(build_vae(VAEConfig.tiny())))
    eager = StreamingDecoder(WanVAE(copy.deepcopy(decoder.vae.model)))  # compiled in place below
    compile_vae(decoder, backend="eager")  # dynamo's guards and graphs without inductor's codegen
    motion = torch.randn(16, 19, 4, 4)
    blocks = [torch.randn(16, 3, 4, 4) for _ in range(4)]
    for _session in range(2):
        state, reference = decoder.new_state(motion), eager.new_state(motion)
        for latents in blocks:
            torch.testing.assert_close(decoder.decode(state, latents), eager.decode(reference, latents))
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
    for t in state.feat_cache:
        if isinstance(t, torch.Tensor):
            assert t.is_contiguous() and t.stride()[0] == t[0].numel()
