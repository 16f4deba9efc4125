"""The KV cache is real: `generate N` with the cache, the same loop rerunning the whole sequence
each step, and transformers' own greedy `generate`, on the same model and prompt, in one run.

    python bench/generation.py                       # a GPT-2-small-shaped random model, 64 tokens
    python bench/generation.py --small --tokens 16   # a tiny one (the test's rehearsal)

Prints and writes (--out) the seconds of each, tokens/s, the no-cache / cache ratio and tdbql /
transformers, and checks that the three produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "When Mary and John went to the store, John gave a drink to"


def checkpoint(folder: Path, small: bool) -> Path:
    """A random GPT-2 saved by transformers, with a byte-level BPE tokenizer trained here."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    shape = dict(n_embd=64, n_layer=2, n_head=4) if small else dict(n_embd=768, n_layer=12, n_head=12)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=512, n_positions=256, bos_token_id=0, eos_token_id=0, **shape)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([PROMPT] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def interleaved(contenders: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """A warm-up call of each, then `repeats` rounds calling each once in turn (so machine load
    hits them alike): the median seconds of each and its last output."""
    outputs = {name: fn() for name, fn in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def run(small: bool, tokens: int, repeats: int) -> dict:
    import transformers

    from tdbql.executor.generate import continuation
    from tdbql.executor.interventions import Interventions
    from tdbql.executor.runtime.loading import load_model
    from tdbql.query.context import PromptRow

    folder = checkpoint(Path(tempfile.mkdtemp()) / "gpt2", small)
    loaded = load_model(str(folder))
    row = PromptRow(prompt_id=0, text=PROMPT)
    none = Interventions()
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([loaded.encode(PROMPT)])

    def hf_generate():
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()

    seconds, out = interleaved({
        "tdbql_kv_cache": lambda: continuation(loaded, row, tokens, 0.0, None, none)[0],
        "tdbql_no_cache": lambda: continuation(loaded, row, tokens, 0.0, None, none, use_cache=False)[0],
        "transformers_generate": hf_generate,
    }, repeats)
    cache_s, plain_s, hf_s = seconds["tdbql_kv_cache"], seconds["tdbql_no_cache"], seconds["transformers_generate"]
    return {
        "command": f"python bench/generation.py{' --small' if small else ''} --tokens {tokens} --repeats {repeats}",
        "load_average": os.getloadavg(), "statistic": f"median of {repeats} interleaved rounds after a warm-up",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
        "model": "GPT-2 shape, random weights, vocab 512" + (" (tiny)" if small else " (12 layers, d_model 768)"),
        "prompt_tokens": ids.shape[1], "new_tokens": tokens,
        "seconds": {"tdbql_kv_cache": cache_s, "tdbql_no_cache": plain_s, "transformers_generate": hf_s},
        "tokens_per_s": {"tdbql_kv_cache": tokens / cache_s, "tdbql_no_cache": tokens / plain_s,
                         "transformers_generate": tokens / hf_s},
        "no_cache_over_cache": plain_s / cache_s,
        "tdbql_over_transformers": cache_s / hf_s,
        "same_tokens": out["tdbql_kv_cache"] == out["tdbql_no_cache"] == out["transformers_generate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.small, args.tokens, args.repeats)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
