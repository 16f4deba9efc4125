"""The shipped embedded model: our runtime gives the logits transformers gives."""

from pathlib import Path

import pytest
import tdbql.executor
import torch
from tdbql.executor.runtime.loading import load_model

DEFAULT_FOLDER = Path(tdbql.executor.__file__).parent / "default_model"
PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "lamp Oslo green Hugo cup lamp Oslo green",
]


def test_shipped_folder_is_small_and_complete():
    files = {p.name for p in DEFAULT_FOLDER.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert sum(p.stat().st_size for p in DEFAULT_FOLDER.iterdir()) <= 10 * 2**20


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_logits_match_transformers(prompt):
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2LMHeadModel.from_pretrained(DEFAULT_FOLDER).eval()
    ours = load_model("default")
    ids = ours.encode(prompt)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
        got = ours.model(torch.tensor([ids]))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
