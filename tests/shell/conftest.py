"""Fixtures for the shell tests: a tiny random GPT-2 checkpoint folder (HF layout, safetensors).

The tokenizer is a byte-level BPE trained here on a few sentences, so that " Mary" and " John"
are single tokens, as they are for GPT-2 and the embedded model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.executor.conftest import train_tokenizer

CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "When John and Mary went to the park, Mary gave a ball to John.",
    "The cat sat on the mat. The dog sat on the log.",
    "Alice and Bob went to the office; Bob gave a book to Alice.",
] * 20


def build_tokenizer():
    return train_tokenizer(CORPUS, 400)


def write_tiny_gpt2(folder: Path) -> Path:
    """Save a random 4-layer GPT-2 (d_model 32) with its tokenizer into `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=64,
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_inner=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tdbql_bin() -> str:
    """The installed console script next to the interpreter running the tests."""
    path = Path(sys.executable).parent / "tdbql"
    if not path.exists():
        pytest.skip("tdbql console script is not installed")
    return str(path)


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return env
