"""A small model description and a fake tokenizer for binding tests (shared by tests/grammar)."""

from __future__ import annotations

import re

from tdbql.query.context import ModelInfo

SINGLE_TOKEN_WORDS = frozenset({"Mary", "John", "Anna", "Bob", "Paris", "the"})


def fake_tokenize(text: str) -> list[int]:
    """Known words (with their leading space) are one token; other words split every 3 chars."""
    ids: list[int] = []
    for piece in re.findall(r"\s?\w+|\s|[^\w\s]", text):
        ids += [1] if piece.strip() in SINGLE_TOKEN_WORDS else [0] * ((len(piece) + 2) // 3)
    return ids


def tiny_model_info() -> ModelInfo:
    """4 layers, 4 heads, d_mlp 512, an MLP autoencoder of 1024 latents at every layer."""
    return ModelInfo(
        name="tiny", arch="gpt2", n_layers=4, n_heads=4, d_model=64, d_mlp=512, vocab_size=1000,
        n_ctx=128, sae_latents=tuple(("mlp", layer, 1024) for layer in range(4)),
    )
