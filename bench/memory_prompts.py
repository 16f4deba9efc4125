"""Peak memory of a streaming node query for 2,000 vs 200 prompts (CPU).

Each size runs in a fresh subprocess: load the model (the embedded default if present, else a
small random GPT-2 saved with transformers), warm up on a few prompts, then run
`topk 20 act_times_grad by layer` over N prompts. Reported per size: the tracemalloc peak
(Python allocations, garbage collected after each batch) and the peak resident set (ru_maxrss) above the warmed-up baseline. The
running top-k keeps k rows per group, so the ratio should stay near 1 (target <= 1.2x).

    python bench/memory_prompts.py [--small 200] [--large 2000] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

WORDS = ("Mary John store drink gave went when and the to a cat sat on mat Paris Rome tower is in one two three "
         "four five six seven").split()


def make_prompts(n: int):
    from tdbql.query.context import PromptRow

    texts = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 9)]
        texts.append(PromptRow(prompt_id=i, text=" ".join(words), target=" Mary", distractor=" John"))
    return texts


def load():
    from tdbql.executor.runtime.loading import load_model
    from tdbql.query.errors import TdbqlError

    try:
        return load_model("default")
    except (TdbqlError, FileNotFoundError, OSError):
        return load_model(str(random_checkpoint()))


def random_checkpoint() -> Path:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = Path(tempfile.mkdtemp()) / "gpt2_random"
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=600, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([p.text for p in make_prompts(200)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def measure(n: int, batch_size: int) -> dict:
    from tdbql.executor.engine import Engine
    from tdbql.query.bind import bind, bind_query
    from tdbql.query.plan import NodeQuery, ScalarSpec

    loaded = load()
    # collect cyclic garbage after each batch (library calls leave some behind, e.g. ast.literal_eval
    # closures), so tracemalloc's peak measures what the query keeps alive, not when gc happens to run
    engine = Engine(loaded, batch_size=batch_size, progress=lambda done, total: gc.collect())
    query = NodeQuery(mode="topk", k=20, scalars=(ScalarSpec(name="act_times_grad"),), by=("layer",))
    query = bind(query, None, info=loaded.info(), tokenize=loaded.encode)
    query = bind_query(query, None, session_loss=None, prompts_have_targets=True)  # every prompt has its target
    engine.run(query, make_prompts(batch_size * 2))  # warm up: allocator pools, lazy imports
    prompts = make_prompts(n)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    table = engine.run(query, prompts)["result"]
    _, peak_py = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"prompts": n, "rows": table.num_rows, "tracemalloc_peak_kib": peak_py / 1024,
            "rss_peak_kib": peak_rss, "rss_growth_kib": peak_rss - baseline_rss, "model": loaded.name}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker", type=int, default=None)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.batch_size)))
        return
    results = []
    for n in (args.small, args.large):
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--batch-size", str(args.batch_size)],
                             check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, large = results
    for r in results:
        print(f"{r['prompts']:>6} prompts ({r['model']}): rows {r['rows']}, tracemalloc peak "
              f"{r['tracemalloc_peak_kib']:.0f} KiB, RSS peak {r['rss_peak_kib'] / 1024:.1f} MiB "
              f"(+{r['rss_growth_kib'] / 1024:.1f} MiB over warm-up)")
    py_ratio = large["tracemalloc_peak_kib"] / max(small["tracemalloc_peak_kib"], 1e-9)
    rss_ratio = large["rss_peak_kib"] / small["rss_peak_kib"]
    print(f"ratio {args.large}/{args.small}: tracemalloc peak {py_ratio:.2f}x, RSS peak {rss_ratio:.2f}x "
          f"(target <= 1.2x)")


if __name__ == "__main__":
    main()
