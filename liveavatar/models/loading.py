"""Load every model of a LiveAvatar checkpoint from the ORIGINAL folder layout (docs/model.md, "Checkpoint layout").

    <ckpt_dir>/config.json + diffusion_pytorch_model-0000N-of-0000M.safetensors (+ .index.json)   DiT
    <ckpt_dir>/Wan2.1_VAE.pth                                                                     VAE
    <ckpt_dir>/models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/                                 text
    <ckpt_dir>/wav2vec2-large-xlsr-53-english/                                                    audio
    <lora_path> (liveavatar.safetensors)                                                          LoRA

Large weights never exist twice in RAM: the DiT is built on the `meta` device and each shard tensor is
read, LoRA-merged, cast and moved to the target device before the next one is read; the `.pth` files
are memory-mapped. Any missing or unexpected key is an error that names it. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from liveavatar.models.audio_features import AudioFeatureExtractor
from liveavatar.models.config import DiTConfig
from liveavatar.models.lora import (
    LORA_SCALE,
    check_lora_targets,
    lora_target_modules,
    merge_lora_weight,
    parse_lora_state_dict,
)
from liveavatar.models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder,
    convert_original_t5_state_dict,
)
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.models.vae import VAEConfig, WanVAE, build_vae, convert_original_vae_state_dict

log = logging.getLogger(__name__)

DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"


@dataclass(eq=False)
class Pipeline:
    """Every model one generator needs; the weights are shared by all sessions."""

    dit: LiveAvatarDiT
    vae: WanVAE
    text_encoder: TextEncoder
    audio: AudioFeatureExtractor

    @property
    def config(self) -> DiTConfig:
        return self.dit.config


def check_state_dict_keys(expected: set[str], found: set[str], what: str) -> None:
    """Raise naming every missing and unexpected key (sorted, so the message is stable)."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unexpected keys {unexpected}"] if unexpected else []
        raise KeyError(f"{what}: " + "; ".join(parts))


def check_no_meta(module: nn.Module, what: str) -> None:
    """After streaming, any tensor still on `meta` was never loaded."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise KeyError(f"{what}: tensors never loaded: {left}")


def assign_tensor(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace one (meta) parameter by a loaded tensor, checking its shape."""
    owner_name, _, attr = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, attr)
    if old.shape != tensor.shape:
        raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(old.shape)}")
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"missing checkpoint file {path}")
    # mmap: the 11 GB T5 file is paged in tensor by tensor while it is moved to the device.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def dit_shards(ckpt_dir: Path) -> dict[str, list[str]]:
    """Shard file -> its tensor names, from the index (or the single unsharded file)."""
    index = ckpt_dir / DIT_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return dict(sorted(shards.items()))
    single = ckpt_dir / DIT_SINGLE
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {DIT_SINGLE: list(f.keys())}
    raise FileNotFoundError(f"no {DIT_INDEX} or {DIT_SINGLE} in {ckpt_dir}")


def load_lora(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found (nothing is downloaded; pass a local path)")
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_dit(
    ckpt_dir: str | Path,
    lora_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    lora_scale: float = LORA_SCALE,
    progress: bool = True,
) -> LiveAvatarDiT:
    """Build the DiT on `meta` and stream the shards in, merging the LoRA tensor by tensor."""
    ckpt_dir = Path(ckpt_dir)
    config = DiTConfig.from_json(ckpt_dir / "config.json")
    with torch.device("meta"):
        dit = LiveAvatarDiT(config)
    expected = set(dit.state_dict())
    shards = dit_shards(ckpt_dir)
    check_state_dict_keys(expected, {k for keys in shards.values() for k in keys}, f"DiT ({ckpt_dir})")

    merges = {}
    if lora_path is not None:
        pairs = parse_lora_state_dict(load_lora(lora_path))
        check_lora_targets(pairs, lora_target_modules(dit))
        merges = {f"{module}.weight": pair for module, pair in pairs.items()}

    for shard, keys in tqdm(shards.items(), desc="DiT shards", unit="shard", disable=not progress):
        with safe_open(ckpt_dir / shard, "pt", device="cpu") as f:
            missing = sorted(set(keys) - set(f.keys()))
            if missing:
                raise KeyError(f"DiT shard {shard}: missing keys {missing} (listed in the index)")
            for key in keys:
                tensor = f.get_tensor(key).to(device=device, dtype=dtype)
                if key in merges:
                    tensor = merge_lora_weight(tensor, merges[key], lora_scale)
                assign_tensor(dit, key, tensor)
    check_no_meta(dit, "DiT")
    return dit.eval().requires_grad_(False)


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> WanVAE:
    original = _load_pth(Path(path))
    if "encoder.conv1.weight" not in original:
        raise KeyError(f"VAE ({path}): missing keys ['encoder.conv1.weight']")
    # The width is read from the file so the tiny test checkpoint loads through the same code.
    config = VAEConfig(base_dim=original["encoder.conv1.weight"].shape[0])
    converted = convert_original_vae_state_dict(original)
    vae = build_vae(config, device="meta")
    check_state_dict_keys(set(vae.state_dict()), set(converted), f"VAE ({path})")
    vae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in converted.items()}, assign=True)
    return WanVAE(vae)


def text_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> TextEncoderConfig:
    """Shapes decide the umT5 size, so the tiny test checkpoint loads through the same code."""
    vocab, dim = state_dict["token_embedding.weight"].shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    ffn_dim = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
    buckets, heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    return TextEncoderConfig(
        vocab_size=vocab,
        dim=dim,
        ffn_dim=ffn_dim,
        num_heads=heads,
        num_layers=num_layers,
        num_buckets=buckets,
    )


def load_text_encoder(
    ckpt_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> TextEncoder:
    ckpt_dir = Path(ckpt_dir)
    original = _load_pth(ckpt_dir / T5_FILE)
    if "token_embedding.weight" not in original:
        raise KeyError(f"T5 ({ckpt_dir / T5_FILE}): missing keys ['token_embedding.weight']")
    config = text_config_from_state_dict(original)
    model = build_text_encoder(config, device="meta")
    converted = convert_original_t5_state_dict(original)
    check_state_dict_keys(set(model.state_dict()), set(converted), f"T5 ({ckpt_dir / T5_FILE})")
    moved: dict[int, torch.Tensor] = {}  # the tied embedding is stored once, under two names
    for key, value in converted.items():
        converted[key] = moved.setdefault(id(value), value.to(device=device, dtype=dtype))
    model.load_state_dict(converted, assign=True)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir / TOKENIZER_DIR, local_files_only=True)
    return TextEncoder(model.eval(), tokenizer, text_len=config.text_len)


def load_audio_encoder(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> AudioFeatureExtractor:
    """The folder's `Wav2Vec2ForCTC` (its CTC head is unused; the hidden states are the features)."""
    model, info = Wav2Vec2ForCTC.from_pretrained(folder, local_files_only=True, dtype=dtype, output_loading_info=True)
    # A missing weight would silently stay random; `masked_spec_embed` is training-only (SpecAugment).
    missing = sorted(k for k in info["missing_keys"] if not k.endswith("masked_spec_embed"))
    if missing:
        raise KeyError(f"wav2vec2 ({folder}): missing keys {missing}")
    if info["unexpected_keys"]:
        log.warning("wav2vec2 (%s): ignoring unexpected keys %s", folder, sorted(info["unexpected_keys"]))
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
    return AudioFeatureExtractor(model.to(device).eval().requires_grad_(False), do_normalize=extractor.do_normalize)


def load_pipeline(
    ckpt_dir: str | Path,
    lora_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    text_device: torch.device | str | None = None,
    progress: bool = True,
) -> Pipeline:
    """Load DiT (+ merged LoRA), VAE, umT5 + tokenizer and wav2vec2 from an original checkpoint folder.

    `text_device` (default: `device`) lets the 11 GB text encoder stay on the CPU; it runs once per
    avatar prompt.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} not found")
    return Pipeline(
        dit=load_dit(ckpt_dir, lora_path, device, dtype, progress=progress),
        vae=load_vae(ckpt_dir / VAE_FILE, device, dtype),
        text_encoder=load_text_encoder(ckpt_dir, text_device or device, dtype),
        audio=load_audio_encoder(ckpt_dir / WAV2VEC_DIR, device, dtype),
    )
