"""DiT configuration (the checkpoint's `config.json`) and the output sizes the DiT accepts.

Field names are the constructor arguments of the original `WanModel_S2V` / `CausalWanModel_S2V`, so a
checkpoint's config.json maps onto this dataclass key for key. Only the LiveAvatar (S2V + FramePack +
AdaIN audio) architecture is implemented; `validate()` rejects anything else with a clear message
instead of building a model that silently computes something different.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FULL_AUDIO_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
ACCEPTED_CLASS_NAMES = ("WanModel_S2V", "CausalWanModel_S2V", "LiveAvatarDiT")


@dataclass
class DiTConfig:
    """Architecture numbers of the LiveAvatar DiT; defaults are the 14B checkpoint's values."""

    model_type: str = "s2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    audio_inject_layers: tuple[int, ...] = FULL_AUDIO_INJECT_LAYERS
    zero_init: bool = True  # only shapes the original's random init; checkpoint values override, unused here
    zero_timestep: bool = True
    enable_motioner: bool = False
    add_last_motion: bool = True
    enable_tsm: bool = False
    trainable_token_pos_emb: bool = False
    motion_token_num: int = 1024
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"
    # Not a config.json key: wav2vec2-large exposes 25 hidden states (embeddings + 24 layers), which
    # fixes the shape of `casual_audio_encoder.weights` [1, 25, 1, 1].
    audio_layers: int = field(default=25, metadata={"checkpoint_key": False})

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        self.window_size = tuple(self.window_size)
        self.audio_inject_layers = tuple(int(i) for i in self.audio_inject_layers)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def full_14b(cls) -> DiTConfig:
        """The Wan2.2-S2V-14B / LiveAvatar configuration (16,295,755,609 parameters)."""
        return cls()

    @classmethod
    def tiny(cls, num_layers: int = 2, dim: int = 128, num_heads: int = 2) -> DiTConfig:
        """A few-MB model with the same structure, for CPU tests (random weights)."""
        return cls(
            dim=dim,
            ffn_dim=2 * dim,
            num_heads=num_heads,
            num_layers=num_layers,
            text_dim=32,
            audio_dim=32,
            audio_inject_layers=tuple(range(0, num_layers, 2)),
            zero_init=False,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiTConfig:
        """Build from config.json contents; `_`-prefixed bookkeeping keys are ignored."""
        class_name = values.get("_class_name")
        if class_name is not None and class_name not in ACCEPTED_CLASS_NAMES:
            raise ValueError(
                f"config.json describes a {class_name!r}, not a LiveAvatar / Wan2.2-S2V DiT "
                f"(expected one of {', '.join(ACCEPTED_CLASS_NAMES)})"
            )
        if values.get("model_type", "s2v") != "s2v":
            raise ValueError(f"config.json has model_type={values['model_type']!r}; LiveAvatar needs 's2v'")
        known = {f.name for f in fields(cls) if f.metadata.get("checkpoint_key", True)}
        kwargs = {k: v for k, v in values.items() if k in known}
        ignored = sorted(k for k in values if k not in known and not k.startswith("_"))
        if ignored:
            log.warning("DiT config: ignoring keys this implementation does not use: %s", ", ".join(ignored))
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> DiTConfig:
        """Read a checkpoint folder's config.json (or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("audio_layers")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def validate(self) -> None:
        """Reject configurations this implementation does not compute faithfully."""
        required = {
            "model_type": "s2v",
            "patch_size": (1, 2, 2),
            "window_size": (-1, -1),
            "qk_norm": True,
            "cross_attn_norm": True,
            "enable_adain": True,
            "adain_mode": "attn_norm",
            "zero_timestep": True,
            "enable_motioner": False,
            "enable_framepack": True,
            "framepack_drop_mode": "padd",
            "add_last_motion": True,
            "enable_tsm": False,
            "trainable_token_pos_emb": False,
            "in_dim": 16,
            "out_dim": 16,
        }
        for key, want in required.items():
            if getattr(self, key) != want:
                raise ValueError(f"unsupported DiT config: {key}={getattr(self, key)!r} (LiveAvatar uses {want!r})")
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if self.dim % (4 * self.num_audio_token):
            raise ValueError("dim must be divisible by 4 * num_audio_token (audio encoder token groups)")
        if any(not 0 <= i < self.num_layers for i in self.audio_inject_layers):
            raise ValueError(f"audio_inject_layers {self.audio_inject_layers} outside 0..{self.num_layers - 1}")
        if self.cond_dim <= 0:
            raise ValueError("cond_dim must be > 0 (the checkpoint has a cond_encoder)")


# ---------------------------------------------------------------------------------------------------
# Output sizes

SIZE_PRESETS: dict[str, tuple[int, int]] = {"704*384": (704, 384), "688*368": (688, 368), "384*256": (384, 256)}
"""Size strings (width*height) of the original scripts. Like the original `--size`, they are an *area
limit*: the actual output follows the reference image's aspect ratio (see `output_size`)."""

SIZE_MULTIPLE = 64
"""Pixel sizes must be multiples of 64: the VAE divides by 8, patchify by 2, and FramePack's 4x bucket
(Conv3d stride 8 in latent space, `proj_4x`) needs latent h, w divisible by 8. A multiple of 16 would
patchify, but FramePack would floor its token grid and the motion RoPE positions would no longer match
the original, so it is refused rather than approximated."""
SIZE_MIN, SIZE_MAX = 128, 1280


def check_dit_size(width: int, height: int) -> None:
    """Raise ValueError unless (width, height) is a pixel size the DiT can generate."""
    for name, v in (("width", width), ("height", height)):
        if v % SIZE_MULTIPLE or not SIZE_MIN <= v <= SIZE_MAX:
            raise ValueError(
                f"{name} {v} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MIN} and {SIZE_MAX} "
                "(FramePack needs the latent size divisible by 8)"
            )


def best_output_size(image_h: int, image_w: int, max_area: int) -> tuple[int, int]:
    """(height, width), multiples of 64, for an image under an area limit: the original's search
    (docs/model.md §6.1)."""
    if image_h * image_w <= max_area:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = SIZE_MULTIPLE - 1
        b, a, c = d * (image_h + image_w), image_h * image_w, d * d - max_area
        min_scale = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(max_area / (image_h * image_w))
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        nh, nw = int(image_h * scale), int(image_w * scale)
        nh += -nh % SIZE_MULTIPLE
        nw += -nw % SIZE_MULTIPLE
        if nh * nw <= max_area:
            return nh, nw
    # Not reached for ordinary images; keep the area with 64-multiples like the original's fallback.
    side = max(SIZE_MULTIPLE, int(math.sqrt(max_area)) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return side, side


def output_size(size: str, image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) to generate for a `--size` string, optionally following a reference image.

    A preset or any `W*H` is an area limit when an image (height, width) is given, as in the original;
    without an image, an exact multiple-of-64 size is used as is and any other size is fitted to its own
    aspect ratio (e.g. "688*368" -> 640*384).
    """
    try:
        w, h = SIZE_PRESETS.get(size) or tuple(int(v) for v in size.lower().replace("x", "*").split("*"))
    except ValueError:
        raise ValueError(f"size must look like 704*384 (width*height), got {size!r}") from None
    if image_hw is None and w % SIZE_MULTIPLE == 0 and h % SIZE_MULTIPLE == 0:
        check_dit_size(w, h)
        return w, h
    ih, iw = image_hw if image_hw is not None else (h, w)
    oh, ow = best_output_size(ih, iw, w * h)
    check_dit_size(ow, oh)
    return ow, oh
