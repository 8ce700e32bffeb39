"""load_pipeline on a tiny checkpoint written in the ORIGINAL layout; bad keys fail naming themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar.models.config import DiTConfig
from liveavatar.models.loading import (
    DIT_INDEX,
    T5_FILE,
    VAE_FILE,
    load_dit,
    load_pipeline,
    load_text_encoder,
    load_vae,
)
from liveavatar.models.lora import LORA_SCALE, PEFT_PREFIX
from liveavatar.models.random_weights import (
    TinyCheckpoint,
    original_vae_name,
    random_init_,
    write_tiny_checkpoint,
)
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def copy(tiny: TinyCheckpoint, tmp_path: Path) -> Path:
    """A private copy of the checkpoint folder that a test may damage."""
    return Path(shutil.copytree(tiny.ckpt_dir, tmp_path / "ckpt"))


def shard_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(ckpt.glob("diffusion_pytorch_model-*.safetensors")):
        out.update(load_file(shard))
    return out


def test_layout_has_two_shards_an_index_and_the_original_files(tiny: TinyCheckpoint) -> None:
    ckpt = tiny.ckpt_dir
    index = json.loads((ckpt / DIT_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    for name in (
        "config.json",
        VAE_FILE,
        T5_FILE,
        "google/umt5-xxl",
        "wav2vec2-large-xlsr-53-english/config.json",
    ):
        assert (ckpt / name).exists(), name
    assert "encoder.downsamples.0.residual.0.gamma" in torch.load(ckpt / VAE_FILE, weights_only=True)
    assert "blocks.0.pos_embedding.embedding.weight" in torch.load(ckpt / T5_FILE, weights_only=True)


def test_pipeline_loads_and_merges_the_lora_exactly(tiny: TinyCheckpoint) -> None:
    pipe = load_pipeline(tiny.ckpt_dir, tiny.lora_path, dtype=torch.bfloat16, progress=False)
    base = shard_tensors(tiny.ckpt_dir)
    lora = load_file(tiny.lora_path)
    loaded = pipe.dit.state_dict()
    assert set(loaded) == set(base)

    merged = 0
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        a_key = f"{PEFT_PREFIX}{module}.lora_A.default.weight"
        if a_key in lora:
            a, b = lora[a_key].float(), lora[a_key.replace("lora_A", "lora_B")].float()
            expected = (weight.float() + LORA_SCALE * (b @ a)).to(torch.bfloat16)
            assert not torch.equal(expected, weight), key
            merged += 1
        else:
            expected = weight
        assert torch.equal(loaded[key], expected), key
    assert merged == len(lora) // 2 > 0

    vae_file = torch.load(tiny.ckpt_dir / VAE_FILE, weights_only=True)
    for key, value in pipe.vae.model.state_dict().items():
        assert torch.equal(value, vae_file[original_vae_name(key)]), key
    t5 = pipe.text_encoder.model
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
    assert pipe.text_encoder.encode_prompt("a man speaks").shape[1] == pipe.config.text_dim
    feats = pipe.audio.block_features(np.zeros(7680, np.float32), np.zeros(0, np.float32), 0)
    assert feats.shape == (25, pipe.config.audio_dim, 12)


@pytest.mark.parametrize(("prefix", "default"), [(False, True), (True, False), (False, False)])
def test_lora_keys_load_with_or_without_peft_prefix_and_adapter_name(
    tiny: TinyCheckpoint, tmp_path: Path, prefix: bool, default: bool
) -> None:
    renamed = {}
    for key, value in load_file(tiny.lora_path).items():
        key = key if prefix else key.removeprefix(PEFT_PREFIX)
        renamed[key if default else key.replace(".default", "")] = value
    save_file(renamed, tmp_path / "lora.safetensors")

    want = load_dit(tiny.ckpt_dir, tiny.lora_path, progress=False).state_dict()
    got = load_dit(tiny.ckpt_dir, tmp_path / "lora.safetensors", progress=False).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_renamed_dit_key_fails_naming_both_names(copy: Path) -> None:
    index_path = copy / DIT_INDEX
    index = json.loads(index_path.read_text())
    key = "blocks.0.self_attn.q.weight"
    shard = copy / index["weight_map"][key]
    tensors = load_file(shard)
    tensors["blocks.0.self_attn.query.weight"] = tensors.pop(key)
    save_file(tensors, shard)
    index["weight_map"]["blocks.0.self_attn.query.weight"] = index["weight_map"].pop(key)
    index_path.write_text(json.dumps(index))

    with pytest.raises(KeyError, match=r"missing keys \['blocks.0.self_attn.q.weight'\].*unexpected keys"):
        load_dit(copy, progress=False)


def test_key_listed_in_the_index_but_absent_from_its_shard_is_named(copy: Path) -> None:
    index = json.loads((copy / DIT_INDEX).read_text())
    key = "head.head.weight"
    shard = copy / index["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    with pytest.raises(KeyError, match="head.head.weight"):
        load_dit(copy, progress=False)


def test_missing_vae_key_and_unexpected_t5_key_are_named(copy: Path) -> None:
    vae = torch.load(copy / VAE_FILE, weights_only=True)
    del vae["decoder.upsamples.4.shortcut.weight"]
    torch.save(vae, copy / VAE_FILE)
    with pytest.raises(KeyError, match=r"missing keys \['decoder.up_blocks.1.resnets.0.conv_shortcut.weight'\]"):
        load_vae(copy / VAE_FILE)

    t5 = torch.load(copy / T5_FILE, weights_only=True)
    t5["blocks.0.attn.bias"] = torch.zeros(3)
    torch.save(t5, copy / T5_FILE)
    with pytest.raises(KeyError, match="blocks.0.attn.bias"):
        load_text_encoder(copy)


def test_lora_for_an_unknown_module_or_missing_a_target_is_named(tiny: TinyCheckpoint, tmp_path: Path) -> None:
    lora = load_file(tiny.lora_path)
    extra = dict(lora)
    extra[f"{PEFT_PREFIX}blocks.0.self_attn.qkv.lora_A.default.weight"] = torch.zeros(4, 8)
    extra[f"{PEFT_PREFIX}blocks.0.self_attn.qkv.lora_B.default.weight"] = torch.zeros(8, 4)
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(KeyError, match="blocks.0.self_attn.qkv"):
        load_dit(tiny.ckpt_dir, tmp_path / "extra.safetensors", progress=False)

    fewer = {k: v for k, v in lora.items() if ".ffn.2." not in k or ".blocks.1." not in k}
    save_file(fewer, tmp_path / "fewer.safetensors")
    with pytest.raises(KeyError, match=r"without LoRA weights \['blocks.1.ffn.2'\]"):
        load_dit(tiny.ckpt_dir, tmp_path / "fewer.safetensors", progress=False)

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_dit(tiny.ckpt_dir, "Quark-Vision/Live-Avatar", progress=False)


def test_random_init_materialises_a_meta_dit_in_the_requested_dtype() -> None:
    with torch.device("meta"):
        dit = LiveAvatarDiT(DiTConfig.tiny())
    random_init_(dit, "cpu", torch.bfloat16, seed=0)
    params = dict(dit.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params.values())
    assert params["blocks.0.self_attn.q.bias"].eq(0).all()
    assert params["blocks.0.self_attn.norm_q.weight"].eq(1).all()
    assert params["blocks.0.self_attn.q.weight"].std() > 0
