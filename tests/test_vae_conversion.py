"""Wan2.1_VAE.pth names (spec vae-manifest.tsv) map onto AutoencoderKLWan exactly, shapes included."""

from __future__ import annotations

from pathlib import Path

import torch

from liveavatar.models.random_weights import original_vae_name
from liveavatar.models.vae import VAEConfig, build_vae, convert_original_vae_state_dict

MANIFEST = Path(__file__).parent / "data" / "vae-manifest.tsv"


def read_manifest(path: Path) -> dict[str, tuple[int, ...]]:
    rows = path.read_text().strip().splitlines()[1:]
    out = {}
    for row in rows:
        name, shape = row.split("\t")
        out[name] = tuple(int(v) for v in shape.strip("[]").split(","))
    return out


def test_original_names_convert_to_every_diffusers_parameter_with_its_shape() -> None:
    manifest = read_manifest(MANIFEST)
    assert len(manifest) == 194
    original = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}

    converted = convert_original_vae_state_dict(original)
    model = build_vae(VAEConfig.wan21(), device="meta").state_dict()

    assert set(converted) == set(model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.items()}


def test_tiny_checkpoint_names_are_the_inverse_of_the_conversion() -> None:
    manifest = read_manifest(MANIFEST)
    converted = convert_original_vae_state_dict({k: torch.empty(0) for k in manifest})
    back = {original_vae_name(k) for k in converted}
    assert back == set(manifest)
    tiny = build_vae(VAEConfig.tiny(), device="meta").state_dict()
    assert {original_vae_name(k) for k in tiny} == set(manifest)
