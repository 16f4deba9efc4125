"""Peak memory of `routes` over all layers of one long prompt on a GPT-2-small-shaped model.

LLM-TT materialises tokens x tokens x heads x d_model per layer: 36 GiB in fp32 for GPT-2 small
at 1024 tokens, before its 2-3x copies. tdbql tiles the L1 distances and
keeps only thresholded edges per layer. This script builds a random-weight model with GPT-2
small's shape (d_model 768, 12 heads, 12 layers, d_mlp 3072, context 1024; small vocabulary),
runs `routes` on one prompt of --tokens tokens, and reports the process's peak resident set
size (getrusage ru_maxrss), the resident size before the run, and the wall time; on CUDA also
torch.cuda.max_memory_allocated. tracemalloc is reported too, but it sees only Python-heap
allocations (torch's tensors are allocated outside it).

    python bench/routes_memory.py                      # CPU, 1024 tokens, writes bench/results/routes_memory_cpu.json
    python bench/routes_memory.py --device cuda --json bench/results/routes_memory_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import torch
from tdbql.executor.routes import routes
from tdbql.executor.runtime.loading import LoadedModel
from tdbql.executor.runtime.model import ModelConfig, Transformer
from tdbql.query.context import PromptRow
from tdbql.query.plan import RoutesQuery
from tokenizers import Tokenizer, models, pre_tokenizers

GIB = 1024**3


def gpt2_small_shape(vocab: int, n_layers: int) -> ModelConfig:
    return ModelConfig(
        arch="gpt2", vocab_size=vocab, d_model=768, n_layers=n_layers, n_heads=12, d_head=64,
        d_mlp=3072, n_ctx=1024, act="gelu_new",
    )


def random_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02 if "embed" not in name else 0.1)
    return model.to(device).eval().requires_grad_(False)


def word_tokenizer(vocab: int) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.04)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="where to write the figures (default bench/results/routes_memory_<device>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cfg = gpt2_small_shape(args.vocab, args.layers)
    loaded = LoadedModel("gpt2-small-shape-random", random_model(cfg, device), word_tokenizer(args.vocab), cfg, device, torch.float32)
    gen = torch.Generator().manual_seed(1)
    text = " ".join(f"w{i}" for i in torch.randint(args.vocab, (args.tokens,), generator=gen).tolist())
    prompt = PromptRow(prompt_id=0, text=text)
    assert len(loaded.encode(text)) == args.tokens

    rss_before = rss_now_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracemalloc.start()
    start = time.perf_counter()
    out = routes(loaded, RoutesQuery(threshold=args.threshold), [prompt])
    elapsed = time.perf_counter() - start
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    figures = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "layers": args.layers,
        "d_model": cfg.d_model,
        "heads": cfg.n_heads,
        "vocab": args.vocab,
        "threshold": args.threshold,
        "rss_before_routes_gib": round(rss_before / GIB, 3),
        "peak_rss_gib": round(peak_rss_bytes() / GIB, 3),
        "tracemalloc_peak_python_heap_mib": round(py_peak / 2**20, 2),
        "seconds": round(elapsed, 1),
        "route_nodes": out["route_nodes"].num_rows,
        "route_edges": out["route_edges"].num_rows,
        "llmtt_dense_decomposition_per_layer_gib": round(args.tokens**2 * cfg.n_heads * cfg.d_model * 4 / GIB, 2),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        figures["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        figures["gpu"] = torch.cuda.get_device_name(device)
    path = Path(args.json or Path(__file__).parent / "results" / f"routes_memory_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:45s} {value}")
    print(f"written to {path}")
    return figures


if __name__ == "__main__":
    main()
