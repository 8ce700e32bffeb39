"""FP8 linears: the emulated product matches an independent quantize/dequantize reference, the skip
list is honoured, and the error against bf16 stays at the level the per-tensor E4M3 recipe allows."""

import pytest
import torch
import torch.nn as nn

from engines.fp8 import FP8_DTYPE, FP8Linear, convert_linears_to_fp8, quantize, reference_fp8_linear


def test_quantize_uses_whole_tensor_scale_and_saturates_at_448():
    x = torch.randn(64, 32) * 3
    xq, inv_scale = quantize(x)
    assert xq.dtype == FP8_DTYPE
    assert torch.isclose(inv_scale, x.abs().max() / 448)
    assert xq.float().abs().max().item() == 448.0
    zero_q, zero_inv = quantize(torch.zeros(4, 4))
    assert zero_q.float().abs().max() == 0 and torch.isfinite(zero_inv)


def test_emulated_fp8_linear_matches_float64_reference():
    torch.manual_seed(0)
    lin = nn.Linear(96, 48).to(torch.bfloat16)
    x = torch.randn(3, 20, 96, dtype=torch.bfloat16)
    got = FP8Linear(lin, emulate=True)(x)
    ref = reference_fp8_linear(x, lin.weight.data, lin.bias.data)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 20, 48)
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel < 4e-3, rel  # only the final bf16 rounding separates the two


def test_fp8_error_against_bf16_is_within_e4m3_budget():
    torch.manual_seed(1)
    lin = nn.Linear(512, 512).to(torch.bfloat16)
    x = torch.randn(256, 512, dtype=torch.bfloat16)
    exact = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    bf16_rel = ((lin(x).double() - exact).norm() / exact.norm()).item()
    fp8_rel = ((FP8Linear(lin, emulate=True)(x).double() - exact).norm() / exact.norm()).item()
    # e4m3 keeps 3 mantissa bits: ~2-4% relative error per product for Gaussian data, bf16 ~0.3%
    assert bf16_rel < 5e-3
    assert 5e-3 < fp8_rel < 6e-2, fp8_rel


def test_convert_skips_named_layers_and_drops_bf16_weights():
    model = nn.ModuleDict(
        {
            "time_embedding": nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32)),
            "blocks": nn.ModuleList([nn.ModuleDict({"q": nn.Linear(32, 32), "ffn": nn.Linear(32, 64)})]),
            "head": nn.ModuleDict({"head": nn.Linear(64, 8)}),
        }
    ).to(torch.bfloat16)
    converted = convert_linears_to_fp8(model, skip=("time_embedding", "head.head"), emulate=True)
    assert converted == ["blocks.0.q", "blocks.0.ffn"]
    assert isinstance(model["blocks"][0]["q"], FP8Linear)
    assert isinstance(model["time_embedding"][0], nn.Linear)
    assert isinstance(model["head"]["head"], nn.Linear)
    assert model["blocks"][0]["q"].weight_fp8.dtype == FP8_DTYPE
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    assert model["blocks"][0]["ffn"](model["blocks"][0]["q"](x)).shape == (5, 64)


def test_per_sample_fp8_gives_each_sample_of_a_batch_what_it_gets_alone():
    """A batch of sessions' activations (a quiet one beside a loud one): each sample keeps its own scale,
    so its result is the one-sample result bit for bit; the per-tensor recipe would let the loud one
    coarsen the quiet one's grid."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 48).to(torch.bfloat16)
    x = torch.cat([torch.randn(1, 20, 96) * 0.05, torch.randn(1, 20, 96) * 8]).to(torch.bfloat16)
    per_sample, per_tensor = FP8Linear(lin, emulate=True, per_sample=True), FP8Linear(lin, emulate=True)
    got = per_sample(x)
    for i in range(2):
        assert torch.equal(got[i : i + 1], per_tensor(x[i : i + 1]))
    assert torch.equal(per_sample(x[:1]), per_tensor(x[:1])), "one sample: exactly the per-tensor recipe"
    assert not torch.equal(per_tensor(x)[0], got[0])
    model = nn.Sequential(nn.Linear(32, 32))
    convert_linears_to_fp8(model, emulate=True, per_sample=True)
    assert model[0].per_sample and "per-sample" in repr(model)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores"
)
def test_per_sample_fp8_on_tensor_cores_matches_one_sample_at_a_time():
    """The row-wise scaled kernel of a batch against the per-tensor kernel of each sample alone: the same
    quantized operands, so only the kernels' accumulation and rounding order differ."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 512).to("cuda", torch.bfloat16)
    x = torch.cat([torch.randn(1, 40, 256) * 0.05, torch.randn(1, 40, 256) * 8]).to("cuda", torch.bfloat16)
    layer = FP8Linear(lin, per_sample=True)
    assert not layer.emulate
    got = layer(x)
    for i in range(2):
        alone = layer(x[i : i + 1])
        rel = ((got[i : i + 1].float() - alone.float()).norm() / alone.float().norm()).item()
        assert rel < 1e-2, rel
