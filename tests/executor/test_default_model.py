"""The embedded default model: shipped files, tokenizer, behaviours (through transformers), SAEs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "executor" / "default_model"
SAE_DIR = REPO / "executor" / "default_saes"
sys.path.insert(0, str(REPO / "scripts"))

transformers = pytest.importorskip("transformers")
import build_corpus  # noqa: E402
import evaluate_default_model as evaluation  # noqa: E402


@pytest.fixture(scope="module")
def backend() -> evaluation.Backend:
    torch.manual_seed(0)
    return evaluation.transformers_backend(MODEL_DIR)


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


def test_folder_holds_only_the_three_files_and_is_small():
    names = {f.name for f in MODEL_DIR.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json"}
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= 10_000_000


def test_config_is_a_small_tied_gpt2(config):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    assert config["model_type"] == "gpt2"
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_inner"]) == (4, 4, 128, 512)
    assert config["vocab_size"] == tokenizer.get_vocab_size()
    assert config["activation_function"] == "gelu_new"
    assert config.get("tie_word_embeddings", True)
    weights = load_file(str(MODEL_DIR / "model.safetensors"))
    assert "lm_head.weight" not in weights or torch.equal(
        weights["lm_head.weight"], weights["transformer.wte.weight"]
    )
    assert weights["transformer.wte.weight"].shape == (config["vocab_size"], 128)


def test_tokenizer_keeps_names_and_answers_whole(backend):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    build_corpus.check_single_tokens(tokenizer)
    text = "When Mary and John went to the store, John gave a drink to Mary."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.token_to_id(build_corpus.EOS) is not None


def test_corpus_keeps_heldout_names_out_of_ioi():
    documents = build_corpus.build_documents(3000, seed=5)
    build_corpus.check_heldout(documents)
    ioi_texts = [text for kind, text in documents if kind == "ioi"]
    heldout_prompts = {t.split("{A}")[0] for t in build_corpus.IOI_HELDOUT_TEMPLATES}
    assert not any(text.startswith(p) for text in ioi_texts for p in heldout_prompts)
    with pytest.raises(AssertionError):
        build_corpus.check_heldout([("ioi", f"{build_corpus.HELDOUT_NAMES[0]} gave a pen to Mary.")])


def test_ioi_generalises_to_heldout_templates(backend):
    examples = evaluation.ioi_examples(build_corpus.TRAIN_NAMES, build_corpus.IOI_HELDOUT_TEMPLATES, 40)
    assert evaluation.ioi_accuracy(backend, examples) >= 0.85


def test_ioi_generalises_to_heldout_names_in_heldout_templates(backend):
    """Held-out names never occur in IOI training sentences, nor these templates; the shipped
    model is 96% here on 300 prompts (docs/default_model.md), 40 keep the test quick."""
    examples = evaluation.ioi_examples(build_corpus.HELDOUT_NAMES, build_corpus.IOI_HELDOUT_TEMPLATES, 40)
    assert all(e.io in build_corpus.HELDOUT_NAMES and e.subject in build_corpus.HELDOUT_NAMES for e in examples)
    assert evaluation.ioi_accuracy(backend, examples) >= 0.85


def test_training_templates_are_composed_from_parts():
    templates = build_corpus.IOI_TRAIN_TEMPLATES
    parts = (build_corpus.IOI_OPENINGS, build_corpus.IOI_CONNECTORS, build_corpus.IOI_ACTIONS)
    assert len(set(templates)) == len(templates) == len(parts[0]) * len(parts[1]) * len(parts[2])
    assert all(t.count("{A}") == t.count("{B}") == t.count("{S}") == t.count("{IO}") == 1 for t in templates)
    assert not set(templates) & set(build_corpus.IOI_HELDOUT_TEMPLATES)
    heldout_verbs = {"mailed", "tossed", "returned"}
    assert not any(heldout_verbs & build_corpus.words_of(t) for t in templates)


def test_factual_recall(backend):
    prompts = build_corpus.fact_eval_prompts()[::4]
    assert ("The capital of France is", "Paris") in build_corpus.fact_eval_prompts()
    assert evaluation.fact_accuracy(backend, prompts) >= 0.8


def test_induction_loss_drops_on_the_repeat(backend):
    first, second = evaluation.induction_losses(backend, n_sequences=8, length=12)
    assert second <= 0.5 * first


def test_eval_functions_score_a_flat_model_as_failing(backend):
    """Constant logits: no IOI preference, wrong top-1 answer, no induction gain."""
    vocab = backend.logits(backend.encode("The")).shape[-1]
    flat = evaluation.Backend("flat", backend.encode, lambda ids: torch.zeros(len(ids), vocab))
    examples = evaluation.ioi_examples(build_corpus.TRAIN_NAMES, build_corpus.IOI_TRAIN_TEMPLATES, 5)
    assert evaluation.ioi_accuracy(flat, examples) == 0.0
    assert evaluation.fact_accuracy(flat, build_corpus.fact_eval_prompts()[:5]) == 0.0
    first, second = evaluation.induction_losses(flat, n_sequences=2, length=6)
    assert first == pytest.approx(second)


@pytest.fixture(scope="module")
def mlp_post_activations(backend) -> list[torch.Tensor]:
    """transformers' GPT-2 MLP post-GELU activations per layer, [T, d_mlp], on a few IOI sentences."""
    model = transformers.GPT2LMHeadModel.from_pretrained(MODEL_DIR).eval()
    captured: list[torch.Tensor] = []
    for block in model.transformer.h:
        block.mlp.act.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    examples = evaluation.ioi_examples(build_corpus.TRAIN_NAMES, build_corpus.IOI_TRAIN_TEMPLATES, 4)
    with torch.no_grad():
        model(torch.tensor([backend.encode(" ".join(example.text for example in examples))]))
    return captured


def test_saes_fit_in_the_size_budget():
    assert sum(f.stat().st_size for f in SAE_DIR.rglob("*") if f.is_file()) <= 10_000_000


@pytest.mark.parametrize("layer", range(4))
def test_saes_in_saelens_layout_reconstruct_mlp_activations(mlp_post_activations, layer):
    folder = SAE_DIR / f"mlp_L{layer}"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["hook_name"] == f"blocks.{layer}.mlp.hook_post" and cfg["architecture"] == "standard"
    assert cfg["apply_b_dec_to_input"] is True and cfg["hook_layer"] == layer
    w = {k: v.float() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    assert w["W_enc"].shape == (d_in, d_sae) and w["W_dec"].shape == (d_sae, d_in)
    assert w["b_enc"].shape == (d_sae,) and w["b_dec"].shape == (d_in,)
    x = mlp_post_activations[layer]  # [T, d_mlp]
    z = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    recon = z @ w["W_dec"] + w["b_dec"]
    explained = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert explained > 0.6
    assert 0 < (z > 0).float().sum(-1).mean() < d_sae / 4
