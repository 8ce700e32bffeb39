"""Models with random weights: a tiny checkpoint in the ORIGINAL file layout, and file-free pipelines.

`write_tiny_checkpoint` exercises the real loading path (shards + index, `.pth` files with the original
names, tokenizer and wav2vec2 folders, a LoRA) in tests; `random_pipeline` builds the same models
directly, with no files at all (CPU tests, `--random-weights tiny`, 14B-sized GPU benchmarks).

The tokenizer cannot be umT5's (its sentencepiece model is not downloadable offline), so the tiny one
is a transformers `T5Tokenizer` built from an explicit unigram vocabulary: words, single characters
and the T5 special tokens. It tokenises any prompt (unknown pieces fall back to characters / <unk>).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import T5Tokenizer, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from liveavatar.models.audio_features import AudioFeatureExtractor, tiny_wav2vec2_config
from liveavatar.models.config import DiTConfig
from liveavatar.models.loading import Pipeline
from liveavatar.models.lora import PEFT_PREFIX, lora_target_modules
from liveavatar.models.text_encoder import _BLOCK_NAMES, TextEncoder, TextEncoderConfig, build_text_encoder
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.models.vae import VAEConfig, WanVAE, build_vae

_WORDS = [
    "a",
    "an",
    "the",
    "man",
    "woman",
    "person",
    "boy",
    "girl",
    "speaks",
    "talks",
    "smiling",
    "portrait",
    "of",
    "in",
    "front",
    "camera",
    "is",
    "and",
    "with",
]


def tiny_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    vocab += [(c, -4.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_wav2vec2(hidden_size: int, seed: int = 0) -> Wav2Vec2ForCTC:
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        return Wav2Vec2ForCTC(tiny_wav2vec2_config(hidden_size)).eval()


def xlsr53_config() -> Wav2Vec2Config:
    """wav2vec2-large-xlsr-53's architecture (315M parameters), for random-weight benchmarks."""
    return Wav2Vec2Config(
        vocab_size=33, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        conv_dim=(512,) * 7, conv_bias=True, do_stable_layer_norm=True, feat_extract_norm="layer",
    )  # fmt: skip


def random_init_(module: nn.Module, device: torch.device | str, dtype: torch.dtype, seed: int) -> None:
    """Materialise a `meta` module directly in `dtype` on `device` with simple random values.

    Used for the 14B DiT, whose default fp32 init would need 65 GB: biases 0, 1-D weights (norm
    scales) 1, everything else N(0, 1/fan_in).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(module.named_parameters()):
        t = torch.empty(p.shape, device=device, dtype=dtype)
        if name.endswith("bias"):
            t.zero_()
        elif p.dim() == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, (p.numel() / p.shape[0]) ** -0.5, generator=gen)
        owner_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner_name), attr, nn.Parameter(t, requires_grad=False))


def random_pipeline(
    kind: str = "tiny", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Pipeline:
    """All models with random weights and no files: "tiny" (CPU tests) or "14b" (GPU benchmarks).

    "14b" has the full DiT, VAE and wav2vec2; its text encoder is a 1-layer umT5 of width 4096 (the
    prompt is encoded once per avatar, off the streaming path, so its size does not matter there).
    """
    if kind not in ("tiny", "14b"):
        raise ValueError(f"random weights must be 'tiny' or '14b', got {kind!r}")
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        return _random_pipeline(kind, device, dtype, seed)


def _random_pipeline(kind: str, device: torch.device | str, dtype: torch.dtype, seed: int) -> Pipeline:
    tokenizer = tiny_tokenizer()
    if kind == "tiny":
        dit_cfg, vae_cfg = DiTConfig.tiny(), VAEConfig.tiny()
        dit = LiveAvatarDiT(dit_cfg).to(device, dtype)
        wav2vec = tiny_wav2vec2(dit_cfg.audio_dim, seed)
    else:
        dit_cfg, vae_cfg = DiTConfig.full_14b(), VAEConfig.wan21()
        with torch.device("meta"):
            dit = LiveAvatarDiT(dit_cfg)
        random_init_(dit, device, dtype, seed)
        with torch.device(device):  # initialised where it runs: on a CPU first it took ~10 s of every start
            wav2vec = Wav2Vec2ForCTC(xlsr53_config()).eval()
    text_cfg = TextEncoderConfig(vocab_size=len(tokenizer), dim=dit_cfg.text_dim, ffn_dim=2 * dit_cfg.text_dim,
                                 num_heads=4, num_layers=1 if kind == "14b" else 2)  # fmt: skip
    text = build_text_encoder(text_cfg, device).to(dtype=dtype)  # built where it runs: 3 s on a CPU at 14b width
    vae = build_vae(vae_cfg, device)
    nn.Module.to(vae, dtype=dtype)  # (diffusers' ModelMixin.to warns about casting; nothing to keep fp32)
    return Pipeline(
        dit=dit.eval().requires_grad_(False),
        vae=WanVAE(vae),
        text_encoder=TextEncoder(text, tokenizer, text_len=dit_cfg.text_len),
        audio=AudioFeatureExtractor(wav2vec.to(device, dtype).requires_grad_(False)),
    )


# --- the original file layout -----------------------------------------------------------------------


def original_vae_name(key: str) -> str:
    """diffusers `AutoencoderKLWan` name -> `Wan2.1_VAE.pth` name (inverse of diffusers' converter)."""
    resnet = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
              "conv_shortcut": "shortcut"}  # fmt: skip
    parts = key.split(".")
    fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    if parts[0] in fixed:
        return ".".join([fixed[parts[0]], *parts[1:]])
    side, rest = parts[0], parts[1:]
    if rest[0] == "conv_in":
        return ".".join([side, "conv1", *rest[1:]])
    if rest[0] in ("norm_out", "conv_out"):
        return ".".join([side, "head", "0" if rest[0] == "norm_out" else "2", *rest[1:]])
    if rest[0] == "mid_block":
        if rest[1] == "attentions":
            return ".".join([side, "middle", "1", *rest[3:]])
        return ".".join([side, "middle", str(2 * int(rest[2])), resnet[rest[3]], *rest[4:]])
    if rest[0] == "down_blocks":
        name = resnet.get(rest[2], rest[2])
        return ".".join([side, "downsamples", rest[1], name, *rest[3:]])
    if rest[0] == "up_blocks":  # 3 resnets + 1 upsampler per level in the original flat list
        level = int(rest[1])
        if rest[2] == "upsamplers":
            return ".".join([side, "upsamples", str(4 * level + 3), *rest[4:]])
        return ".".join([side, "upsamples", str(4 * level + int(rest[3])), resnet[rest[4]], *rest[5:]])
    raise KeyError(f"no original name for VAE key {key}")


def original_t5_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`UMT5EncoderModel` weights under the names of `models_t5_umt5-xxl-enc-bf16.pth`."""
    inverse = {v: k for k, v in _BLOCK_NAMES.items()}
    out = {}
    for key, value in model.state_dict().items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif key.startswith("encoder.block."):
            _, _, index, local = key.split(".", 3)
            out[f"blocks.{index}.{inverse[local]}"] = value
    return out


def random_lora(dit: nn.Module, rank: int = 4, seed: int = 0, prefix: bool = True, default: bool = True):
    """A LoRA for every target Linear of `dit`, named as PEFT saves it (A and B both non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, linear in lora_target_modules(dit).items():
        key = (PEFT_PREFIX if prefix else "") + name + ".lora_{}" + (".default" if default else "") + ".weight"
        out[key.format("A")] = torch.randn(rank, linear.in_features, generator=gen) * 0.1
        out[key.format("B")] = torch.randn(linear.out_features, rank, generator=gen) * 0.1
    return out


@dataclass(frozen=True)
class TinyCheckpoint:
    ckpt_dir: Path
    lora_path: Path


def write_tiny_checkpoint(root: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> TinyCheckpoint:
    """Write a tiny random model in the original layout under `root` (like `ckpt/` of the scripts):

    root/Wan2.2-S2V-14B/{config.json, 2 DiT shards + index, Wan2.1_VAE.pth,
    models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, wav2vec2-large-xlsr-53-english/} and
    root/LiveAvatar/liveavatar.safetensors.
    """
    root = Path(root)
    ckpt, lora_dir = root / "Wan2.2-S2V-14B", root / "LiveAvatar"
    ckpt.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    pipe = random_pipeline("tiny", seed=seed)
    config = pipe.dit.config

    (ckpt / "config.json").write_text(json.dumps({"_class_name": "WanModel_S2V", **config.to_dict()}, indent=1))
    state = {k: v.to(dtype).contiguous() for k, v in pipe.dit.state_dict().items()}
    keys = sorted(state)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    weight_map = {}
    for shard, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, ckpt / shard)
        weight_map.update(dict.fromkeys(shard_keys, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ckpt / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=1))

    vae_sd = {original_vae_name(k): v.to(dtype) for k, v in pipe.vae.model.state_dict().items()}
    torch.save(vae_sd, ckpt / "Wan2.1_VAE.pth")
    t5_sd = {k: v.to(dtype) for k, v in original_t5_state_dict(pipe.text_encoder.model).items()}
    torch.save(t5_sd, ckpt / "models_t5_umt5-xxl-enc-bf16.pth")
    pipe.text_encoder.tokenizer.save_pretrained(ckpt / "google" / "umt5-xxl")

    w2v_dir = ckpt / "wav2vec2-large-xlsr-53-english"
    pipe.audio.model.save_pretrained(w2v_dir)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True).save_pretrained(w2v_dir)

    lora = {k: v.to(dtype) for k, v in random_lora(pipe.dit, seed=seed).items()}
    save_file(lora, lora_dir / "liveavatar.safetensors")
    return TinyCheckpoint(ckpt_dir=ckpt, lora_path=lora_dir / "liveavatar.safetensors")
