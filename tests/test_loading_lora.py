"""LoRA: the 14B DiT's targets are exactly the manifest's 448 modules; the merge is PEFT's, in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from liveavatar.models.config import DiTConfig
from liveavatar.models.lora import (
    LORA_SCALE,
    LoraPair,
    check_lora_targets,
    lora_target_modules,
    merge_lora_weight,
    parse_lora_state_dict,
)
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT

MANIFEST = Path(__file__).parent / "data" / "lora-manifest.tsv"


def test_full_dit_targets_are_the_manifest_modules_with_matching_shapes() -> None:
    rows = [r.split("\t") for r in MANIFEST.read_text().strip().splitlines()[1:]]
    shapes = {k: tuple(int(v) for v in s.strip("[]").split(",")) for k, s in rows}
    assert len(shapes) == 896
    pairs = parse_lora_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        dit = LiveAvatarDiT(DiTConfig.full_14b())
    targets = lora_target_modules(dit)

    assert len(targets) == len(pairs) == 448
    check_lora_targets(pairs, targets)  # raises on any unexpected / missing module or shape mismatch
    assert all(p.rank == 128 for p in pairs.values())


def test_merge_is_base_plus_half_b_at_a_in_fp32_then_cast() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen).to(torch.bfloat16)
    pair = LoraPair(A=torch.randn(3, 5, generator=gen).to(torch.bfloat16), B=torch.randn(6, 3, generator=gen))

    merged = merge_lora_weight(w, pair)

    exact = w.double() + 0.5 * (pair.B.double() @ pair.A.double())
    assert merged.dtype == torch.bfloat16
    assert LORA_SCALE == 0.5
    torch.testing.assert_close(merged.double(), exact, rtol=1e-2, atol=1e-2)
    assert torch.equal(merged, (w.float() + 0.5 * (pair.B.float() @ pair.A.float())).to(torch.bfloat16))


def test_non_lora_keys_and_half_pairs_are_rejected_by_name() -> None:
    with pytest.raises(KeyError, match="blocks.0.self_attn.q.weight"):
        parse_lora_state_dict({"base_model.model.blocks.0.self_attn.q.weight": torch.zeros(2, 2)})
    with pytest.raises(KeyError, match=r"lacks lora_A or lora_B.*blocks.0.ffn.0"):
        parse_lora_state_dict({"blocks.0.ffn.0.lora_A.weight": torch.zeros(2, 4)})
