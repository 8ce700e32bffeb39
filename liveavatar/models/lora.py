"""The LiveAvatar LoRA (`liveavatar.safetensors`): parse PEFT keys, check targets, merge exactly.

The reference loads it with PEFT (r 128, alpha 64, targets q,k,v,o,ffn.0,ffn.2) and calls
`merge_and_unload`, i.e. `W' = dtype(W + (alpha/r) · B @ A)` with the product and the sum in fp32
(docs/model.md §5.1). We merge the same way while the base weights stream in, so PEFT is not needed and no
unmerged copy of the model ever exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
LORA_SCALE = 0.5
"""alpha / rank = 64 / 128 of the shipped training config (`s2v_causal_sft.yaml`)."""
TARGET_SUFFIXES = (".q", ".k", ".v", ".o", ".ffn.0", ".ffn.2")
"""PEFT `target_modules="q,k,v,o,ffn.0,ffn.2"` matches every module whose name ends like this."""

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight")


@dataclass(eq=False)
class LoraPair:
    """Down (`A`, [rank, in]) and up (`B`, [out, rank]) factors of one target Linear."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def parse_lora_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, LoraPair]:
    """Group `{base_model.model.}<module>.lora_{A,B}[.default].weight` keys by module name.

    A key of any other form, or a module with only one of A/B, is an error that names it: the
    reference would silently ignore (or overwrite base weights with) such tensors.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in state_dict.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.fullmatch(name)
        if match is None:
            bad.append(key)
            continue
        halves.setdefault(match["module"], {})[match["which"]] = value
    if bad:
        raise KeyError(f"LoRA file has keys that are not lora_A/lora_B weights: {bad}")
    incomplete = sorted(m for m, h in halves.items() if len(h) != 2)
    if incomplete:
        raise KeyError(f"LoRA file lacks lora_A or lora_B for modules: {incomplete}")
    pairs = {m: LoraPair(A=h["A"], B=h["B"]) for m, h in halves.items()}
    for module, pair in pairs.items():
        if pair.A.dim() != 2 or pair.B.dim() != 2 or pair.B.shape[1] != pair.rank:
            raise ValueError(f"LoRA {module}: A {tuple(pair.A.shape)} and B {tuple(pair.B.shape)} do not pair up")
    return pairs


def lora_target_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears the LoRA must cover (448 in the 14B DiT), by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(TARGET_SUFFIXES)
    }


def check_lora_targets(pairs: dict[str, LoraPair], targets: dict[str, nn.Linear]) -> None:
    """Every target covered, nothing else, shapes matching; otherwise an error naming the modules."""
    unexpected = sorted(set(pairs) - set(targets))
    missing = sorted(set(targets) - set(pairs))
    if unexpected or missing:
        raise KeyError(
            "LoRA does not match the DiT: "
            + (f"unexpected target modules {unexpected}; " if unexpected else "")
            + (f"modules without LoRA weights {missing}" if missing else "")
        )
    for name, pair in pairs.items():
        linear = targets[name]
        if pair.A.shape[1] != linear.in_features or pair.B.shape[0] != linear.out_features:
            raise ValueError(
                f"LoRA {name}: A {tuple(pair.A.shape)} / B {tuple(pair.B.shape)} do not fit "
                f"Linear({linear.in_features} -> {linear.out_features})"
            )


def merge_lora_weight(weight: torch.Tensor, pair: LoraPair, scale: float = LORA_SCALE) -> torch.Tensor:
    """dtype(W + scale · B @ A), product and sum in fp32 on W's device (PEFT's merge)."""
    delta = pair.B.to(weight.device, torch.float32) @ pair.A.to(weight.device, torch.float32)
    return (weight.float() + scale * delta).to(weight.dtype)


def lora_weight_names(pairs: Iterable[str]) -> dict[str, str]:
    """Parameter name (`<module>.weight`) -> module name, for merging while weights stream in."""
    return {f"{module}.weight": module for module in pairs}
