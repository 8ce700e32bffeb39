"""umT5 encoder: original .pth names map onto UMT5EncoderModel exactly; prompts encode trimmed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from liveavatar.models.random_weights import original_t5_state_dict, tiny_tokenizer
from liveavatar.models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder,
    clean_prompt,
    convert_original_t5_state_dict,
)

MANIFEST = Path(__file__).parent / "data" / "t5-encoder-manifest.tsv"


def read_manifest(path: Path) -> dict[str, tuple[int, ...]]:
    rows = path.read_text().strip().splitlines()[1:]
    return {name: tuple(int(v) for v in shape.strip("[]").split(",")) for name, shape in (r.split("\t") for r in rows)}


def test_manifest_converts_to_every_umt5_xxl_parameter_with_its_shape() -> None:
    manifest = read_manifest(MANIFEST)
    assert len(manifest) == 242
    converted = convert_original_t5_state_dict({k: torch.empty(s, device="meta") for k, s in manifest.items()})
    model = build_text_encoder(TextEncoderConfig.full(), device="meta").state_dict()

    assert set(converted) == set(model)  # shared.weight and encoder.embed_tokens.weight both filled
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.items()}
    assert converted["shared.weight"] is converted["encoder.embed_tokens.weight"]


def test_unknown_original_key_is_named() -> None:
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.weight"):
        convert_original_t5_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(1)})


def test_original_names_round_trip_through_the_tiny_writer() -> None:
    model = build_text_encoder(TextEncoderConfig.tiny())
    original = original_t5_state_dict(model)
    assert "token_embedding.weight" in original and "blocks.1.ffn.gate.0.weight" in original
    converted = convert_original_t5_state_dict(original)
    for key, value in model.state_dict().items():
        assert torch.equal(converted[key], value), key


def test_prompt_features_are_trimmed_to_the_real_tokens_and_match_a_plain_forward() -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = build_text_encoder(TextEncoderConfig.tiny(vocab_size=len(tokenizer), dim=32))
    encoder = TextEncoder(model, tokenizer, text_len=64)

    prompt = "  A woman  talks &amp;amp; smiling\n"
    out = encoder.encode_prompt(prompt)

    ids = tokenizer(clean_prompt(prompt)).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert out.shape == (len(ids), 32)
    plain = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)  # padding keys are masked out
    assert clean_prompt(prompt) == "A woman talks & smiling"
