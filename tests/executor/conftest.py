"""Tiny random checkpoints in Hugging Face format, saved by transformers itself.

Fixtures for every executor test:
- `make_checkpoint(arch, **config_overrides) -> Path`: a folder with config.json,
  model.safetensors and tokenizer.json (cached per session for the same arguments);
- `tiny_model(arch="gpt2", **config_overrides) -> LoadedModel`: that checkpoint loaded (fp32, cpu).

Archs: gpt2, neox (parallel residual), neox_serial, llama (GQA, llama3 rope scaling),
llama_linear (linear rope scaling), mistral (sliding window 4), qwen2 (q/k/v biases, tied
embeddings), qwen3 (q/k norm per head, head_dim 12), phi3 (fused projections, window 5, partial
rotary), olmo2 (post-norms only, q/k norm over all heads), gemma2 (window 4 on layer 0, soft caps
3 and 8), gemma3 (window 4 and rope base 50 on layer 0, linear scaling on layer 1, q/k norms). Weights are re-drawn with a large scale so differences are not hidden by tiny logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 320
CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The Eiffel Tower is in Paris. The Colosseum is in Rome.",
    "one two three four five six seven eight nine ten",
    "A B C D A B C D the cat sat on the mat",
]


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on `corpus`, so that " Mary" and " John" are tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _tokenizer_json() -> str:
    tok = train_tokenizer(CORPUS, 300)
    assert tok.get_vocab_size() <= VOCAB
    return tok.to_str()


def hf_config(arch: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    llama_like = dict(common, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    configs = {
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0),
        "neox": lambda: tf.GPTNeoXConfig(**common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, rotary_pct=0.5, use_parallel_residual=True),
        "neox_serial": lambda: tf.GPTNeoXConfig(**common, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64, rotary_pct=0.25,
                                                use_parallel_residual=False,
                                                rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                                 "partial_rotary_factor": 0.25}),
        "llama": lambda: tf.LlamaConfig(**llama_like, rope_theta=5000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}),
        "llama_linear": lambda: tf.LlamaConfig(**llama_like, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "mistral": lambda: tf.MistralConfig(**llama_like, sliding_window=4),
        "qwen2": lambda: tf.Qwen2Config(**llama_like, tie_word_embeddings=True),
        # the families of executor/runtime/config.py's second half (tests/executor/runtime/test_families.py)
        "qwen3": lambda: tf.Qwen3Config(**llama_like, head_dim=12),
        "phi3": lambda: tf.Phi3Config(**llama_like, sliding_window=5, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                      rope_parameters={
            "rope_type": "default", "rope_theta": 2000.0, "partial_rotary_factor": 0.5}),
        "olmo2": lambda: tf.Olmo2Config(**llama_like, pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "gemma2": lambda: tf.Gemma2Config(**llama_like, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
                                          attn_logit_softcapping=3.0, final_logit_softcapping=8.0),
        "gemma3": lambda: tf.Gemma3TextConfig(**llama_like, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                              layer_types=["sliding_attention", "full_attention"], rope_parameters={
                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                                                  "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                     "rope_theta": 20000.0}}),
    }
    cfg = configs[arch]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Large random weights: norms near 1, biases and matrices O(0.1-0.3)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.5 * noise if p.shape[0] == VOCAB else 0.2 * noise)


_CACHE: dict[str, Path] = {}


def build_checkpoint(root: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a random `arch` model with transformers into a fresh folder under `root`."""
    from transformers import AutoModelForCausalLM

    key = json.dumps([arch, seed, sorted(overrides.items())], default=str)
    if key in _CACHE and _CACHE[key].exists():
        return _CACHE[key]
    folder = root / f"{arch}_{len(_CACHE)}"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    _randomise(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(_TOKENIZER())
    _CACHE[key] = folder
    return folder


def _TOKENIZER(_cache: list[str] = []) -> str:  # noqa: B006 -- trained once per session
    if not _cache:
        _cache.append(_tokenizer_json())
    return _cache[0]


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def make_checkpoint(checkpoint_root):
    def make(arch: str = "gpt2", seed: int = 0, **overrides) -> Path:
        return build_checkpoint(checkpoint_root, arch, seed, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_model(make_checkpoint):
    from tdbql.executor.runtime.loading import load_model

    def load(arch: str = "gpt2", seed: int = 0, **overrides):
        return load_model(str(make_checkpoint(arch, seed, **overrides)))

    return load


def load_hf(folder: Path):
    """The transformers reference model for a checkpoint folder (eager attention, fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    return model.eval()
