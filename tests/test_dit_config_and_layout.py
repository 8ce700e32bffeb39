"""The DiT module tree is the checkpoint, and configs/sizes are validated."""

import json
from pathlib import Path

import pytest
import torch

from liveavatar.models.config import DiTConfig, best_output_size, check_dit_size, output_size
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT

DATA = Path(__file__).parent / "data"


def _manifest() -> dict[str, list[int]]:
    rows = (DATA / "dit-14b-manifest.tsv").read_text().splitlines()[1:]
    return {name: json.loads(shape) for name, shape in (r.split("\t") for r in rows if r)}


def test_full_config_on_meta_has_exactly_the_checkpoint_names_and_shapes():
    with torch.device("meta"):
        dit = LiveAvatarDiT(DiTConfig.full_14b())
    state = {k: list(v.shape) for k, v in dit.state_dict().items()}
    manifest = _manifest()
    assert set(state) == set(manifest)
    assert state == manifest
    assert list(state) == list(manifest), "state-dict order should follow the checkpoint's"
    assert sum(p.numel() for p in dit.parameters()) == 16_295_755_609
    assert len(list(dit.buffers())) == 0


def test_reference_tiny_config_loads_from_json_and_matches_its_weights(tmp_path):
    meta = json.loads((DATA / "reference_tiny" / "tiny_meta.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "WanModel_S2V", "_diffusers_version": "0.35.0", **meta["config"]}))
    cfg = DiTConfig.from_json(tmp_path)
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.audio_inject_layers) == (256, 2, 4, (0, 2))
    from safetensors.torch import load_file

    weights = load_file(DATA / "reference_tiny" / "tiny_weights.safetensors")
    LiveAvatarDiT(cfg).load_state_dict(weights, strict=True)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "t2v"}, "model_type"),
        ({"_class_name": "WanModel"}, "not a LiveAvatar"),
        ({"enable_framepack": False}, "enable_framepack"),
        ({"adain_mode": "attn"}, "adain_mode"),
        ({"audio_inject_layers": [0, 50]}, "audio_inject_layers"),
    ],
)
def test_config_rejects_other_architectures_with_a_clear_error(change, message):
    values = {**DiTConfig.full_14b().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        DiTConfig.from_dict(values)


def test_config_round_trips_and_ignores_bookkeeping_keys():
    cfg = DiTConfig.tiny()
    again = DiTConfig.from_dict({"_class_name": "WanModel_S2V", "_diffusers_version": "0.35.2", **cfg.to_dict()})
    assert again == cfg


def test_size_presets_follow_the_reference_image_like_the_original():
    assert best_output_size(720, 1280, 704 * 384) == (384, 704)
    assert best_output_size(1024, 1024, 704 * 384) == (512, 512)
    assert best_output_size(768, 512, 720 * 400) == (640, 448)
    assert output_size("704*384") == (704, 384)
    assert output_size("384*256") == (384, 256)
    assert output_size("688*368") == (640, 384)  # not a multiple of 64 itself: fitted under its area
    assert output_size("704*384", image_hw=(1024, 1024)) == (512, 512)
    with pytest.raises(ValueError):
        check_dit_size(704, 376)
    with pytest.raises(ValueError):
        output_size("big")
