"""ONNX round trip of the two per-block steps on tiny configs: the DiT block step (KV ring as explicit
inputs/outputs) and the VAE latent-frame decode (causal-conv caches explicit), run by onnxruntime
and compared with PyTorch; and the functional DiT step against the model's own streaming forward."""

import pytest
import torch

from engines.onnx_export import OnnxRunner, compare, export_onnx
from liveavatar.acceleration.export import (
    DIT_INPUT_NAMES,
    DIT_OUTPUT_NAMES,
    DiTBlockStep,
    VAEDecodeStep,
    dit_step_inputs,
    vae_step_inputs,
)
from liveavatar.models.config import DiTConfig
from liveavatar.models.transformer_liveavatar import AudioEmbedding, LiveAvatarDiT
from liveavatar.models.vae import StreamingDecoder, VAEConfig, WanVAE, build_vae
from liveavatar.streaming.dit import KVRing

LH, LW = 8, 8


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return LiveAvatarDiT(DiTConfig.tiny()).eval()


def test_functional_dit_step_matches_streaming_forward(dit):
    inputs = dit_step_inputs(dit, LH, LW, frame_start=24, ref_frame=40)
    latents, t, context, tokens, glob, *_, ring_k, ring_v, cond_k, cond_v, slots = inputs
    with torch.no_grad():
        velocity, new_k, new_v = DiTBlockStep(dit)(*inputs)
    ring = KVRing(dit.config.num_layers, (LH // 2) * (LW // 2))
    # the module keeps [condition ; history] in one buffer; the condition part is rewritten per forward
    ring.cond_tokens = cond_k.shape[2]
    ring.k = [torch.cat([torch.zeros_like(c), k], dim=1) for c, k in zip(cond_k, ring_k, strict=True)]
    ring.v = [torch.cat([torch.zeros_like(c), v], dim=1) for c, v in zip(cond_v, ring_v, strict=True)]
    cond = list(zip(cond_k, cond_v, strict=True))
    want = dit(latents, t, context, AudioEmbedding(tokens, glob), 24, cond, 40, ring.at(24))
    history = [ring.history(layer) for layer in range(dit.config.num_layers)]
    # float32 RoPE tables instead of the original's float64 rotation: rounding-level differences
    assert ((velocity - want).norm() / want.norm()).item() < 1e-4
    assert ((new_k - torch.stack([k for k, _ in history])).norm() / new_k.norm()).item() < 1e-5
    torch.testing.assert_close(new_v, torch.stack([v for _, v in history]))
    assert not torch.equal(new_k[:, :, slots], ring_k[:, :, slots]), "the block's keys must be written"


def test_dit_block_step_onnx_matches_pytorch(dit, tmp_path):
    step = DiTBlockStep(dit)
    inputs = dit_step_inputs(dit, LH, LW)
    path = export_onnx(step, inputs, tmp_path / "dit.onnx", DIT_INPUT_NAMES, DIT_OUTPUT_NAMES)
    runner = OnnxRunner(path)
    assert runner.input_names == DIT_INPUT_NAMES
    fresh = dit_step_inputs(dit, LH, LW, seed=7)  # other values than the export saw
    result = compare(step, runner, fresh)
    assert result.worst() < 1e-4, str(result)


def test_vae_decode_step_onnx_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    decoder = StreamingDecoder(WanVAE(build_vae(VAEConfig.tiny())))
    layout, inputs = vae_step_inputs(decoder, LH, LW)
    step = VAEDecodeStep(decoder.vae, layout)
    names = ["latent"] + [f"cache_{i}" for i in range(len(inputs) - 1)]
    outs = ["frames"] + [f"cache_out_{i}" for i in range(len(inputs) - 1)]
    path = export_onnx(step, inputs, tmp_path / "vae.onnx", names, outs)
    with torch.no_grad():
        frames = step(*inputs)[0]
    assert frames.shape == (3, 4, 8 * LH, 8 * LW)
    _, fresh = vae_step_inputs(decoder, LH, LW, seed=3)
    result = compare(step, OnnxRunner(path), fresh)
    assert result.worst() < 1e-4, str(result)
