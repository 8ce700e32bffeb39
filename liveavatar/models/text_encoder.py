"""umT5-XXL text encoder (transformers `UMT5EncoderModel`) loaded from Wan's original `.pth` names.

The prompt is encoded once per avatar (docs/model.md §6.4) and the trimmed `[L, 4096]` result is what the DiT
consumes; the 11 GB encoder can therefore live on the CPU, or be moved there after encoding.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5 encoder shape; `full()` is umT5-XXL as in `models_t5_umt5-xxl-enc-bf16.pth`."""

    vocab_size: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512

    @classmethod
    def full(cls) -> TextEncoderConfig:
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 128, dim: int = 64) -> TextEncoderConfig:
        return cls(vocab_size=vocab_size, dim=dim, ffn_dim=96, num_heads=4, num_layers=2)

    def to_hf(self) -> UMT5Config:
        return UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.dim,
            d_kv=self.dim // self.num_heads,
            d_ff=self.ffn_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            feed_forward_proj="gated-gelu",  # gelu_tanh(gate(x)) * fc1(x), as the original T5 FFN
            layer_norm_epsilon=1e-6,
            dropout_rate=0.0,
            tie_word_embeddings=False,
            is_encoder_decoder=False,
            use_cache=False,
        )


def build_text_encoder(config: TextEncoderConfig, device: torch.device | str = "cpu") -> UMT5EncoderModel:
    with torch.device(device):
        model = UMT5EncoderModel(config.to_hf())
    return model.eval().requires_grad_(False)


# Per-block original name -> UMT5EncoderModel name (block index substituted).
_BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU-gated branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def convert_original_t5_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`models_t5_umt5-xxl-enc-bf16.pth` names -> `UMT5EncoderModel` names, exactly.

    The token embedding is stored twice (`shared` and `encoder.embed_tokens` are tied in transformers).
    A name that is not part of the umT5 encoder is an error, naming it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif match and match.group(2) in _BLOCK_NAMES:
            out[f"encoder.block.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"T5 checkpoint has keys that are not umT5 encoder weights: {unknown}")
    return out


def clean_prompt(text: str) -> str:
    """The reference's `whitespace_clean(basic_clean(text))` minus ftfy's mojibake repair."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Tokenise with padding to `text_len`, encode, trim to the real token count (EOS included)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder (e.g. to "cpu" once every avatar's prompt is cached)."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt -> [L, dim] features in the encoder's dtype, L = number of non-pad tokens."""
        tokens = self.tokenizer(
            [clean_prompt(prompt)],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[0, : int(mask.sum())]
