"""tdbql's patching sweeps next to TransformerLens' `transformer_lens.patching`, same model and inputs.

Two sweeps, each asked of both tools on one IOI-like clean/corrupt pair of equal token length
(the corrupt prompt swaps the subject name), metric = logit(" Mary") - logit(" John") at the last
token of the corrupt prompt with one activation taken from the clean run:

- resid.pre by position: tdbql `patching of resid.pre from clean by position`, TransformerLens
  `get_act_patch_resid_pre` ([layer, pos], `blocks.L.hook_resid_pre`);
- heads, all positions: tdbql `patching of head from clean`, TransformerLens
  `get_act_patch_attn_head_out_all_pos` ([layer, head], `blocks.L.attn.hook_z`).

tdbql runs through `Session.execute` (text to a DuckDB table), batching the patched copies of
the prompt; TransformerLens 4.x runs one forward per cell through `TransformerBridge`
(HookedTransformer was removed in 4.0), booted offline over the same local HF folder, without
compatibility mode (it folds layer norms and centres weights), under `torch.no_grad()`, with its
clean cache from `run_with_cache` (timed as part of its sweep). Every cell of metric_patched must
agree within --atol; the script exits 1 otherwise.

    python bench/patching_sweeps.py            # GPT-2-small shape, vocab 512 -> bench/results/cpu-patching-sweeps.json
    python bench/patching_sweeps.py --small --repeats 1 --out /tmp/small.json   # 2 layers, d_model 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens.patching draws a progress bar per sweep

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".data" / "bench"
SHAPES = {
    # GPT-2 small's shape with random weights (never downloaded); a small vocabulary saves time.
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, n_inner=3072, vocab_size=512, n_positions=1024),
    "small": dict(n_embd=64, n_layer=2, n_head=4, n_inner=256, vocab_size=512, n_positions=256),
}
WORDS = "When Then Mary John and went to the store park , gave a drink book".split()
CLEAN = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Mary gave a drink to"
TARGET, DISTRACTOR = " Mary", " John"
SWEEPS = {  # name: (tdbql query, transformer_lens.patching function, tdbql column of the 2nd axis)
    "resid_pre_by_position": ("patching of resid.pre from clean by position", "get_act_patch_resid_pre", "position"),
    "head_all_positions": ("patching of head from clean", "get_act_patch_attn_head_out_all_pos", "unit"),
}


def make_checkpoint(shape: str, root: Path = DATA, seed: int = 0) -> Path:
    """A random GPT-2 checkpoint saved by transformers (its own initialisation), with a word-level
    tokenizer over WORDS (then fillers `w<i>`) so that every word of the prompts is one token."""
    folder = root / f"patching-{shape}-seed{seed}"
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    dims = SHAPES[shape]
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(**dims, bos_token_id=0, eos_token_id=0))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    names = ["<unk>", *WORDS]
    vocab = {w: i for i, w in enumerate(names + [f"w{i}" for i in range(len(names), dims["vocab_size"])])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # "store ," and "store," both give two tokens
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# --- tdbql ------------------------------------------------------------------------------------------


def tdbql_session(folder: Path, batch_size: int | None = None):
    from tdbql.shell.session import Session

    session = Session(model=str(folder))
    session.execute(f'prompt "{CLEAN}" corrupt "{CORRUPT}"\ntarget "{TARGET}" vs "{DISTRACTOR}"')
    if batch_size is not None:
        session.execute(f"set batch_size = {batch_size}")
    return session


def tdbql_batch_size(session) -> int:
    """The variants per forward tdbql's sweeps use (`set batch_size` or the memory budget's)."""
    from tdbql.executor.engine import Engine

    return Engine(session.loaded, batch_size=session.settings.batch_size).plan_batch_size(None, session.prompts)


def tdbql_sweep(session, query: str, axis: str, shape: tuple[int, int]) -> dict:
    """metric_patched as a [layer, position|head] grid, with the pair's clean and corrupt metrics."""
    [result] = session.execute(query)
    cols = result.table.to_pydict()
    grid = np.full(shape, np.nan)
    for layer, index, value in zip(cols["layer"], cols[axis], cols["metric_patched"], strict=True):
        grid[layer, index] = value
    assert result.table.num_rows == grid.size and not np.isnan(grid).any(), "tdbql's sweep misses cells"
    return {"grid": grid, "clean": cols["metric_clean"][0], "corrupt": cols["metric_corrupt"][0]}


# --- TransformerLens ---------------------------------------------------------------------------------


def tl_bridge(folder: Path):
    """TransformerBridge over the same HF folder, offline: the HF module and tokenizer are passed in."""
    import transformers as tf
    from transformer_lens.model_bridge import TransformerBridge

    hf = tf.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tokenizer, device="cpu",
                                                 dtype=torch.float32)
    return bridge.eval().requires_grad_(False)


def tl_sweep(bridge, function: str, clean: torch.Tensor, corrupt: torch.Tensor, target: int, distractor: int) -> dict:
    """The clean cache (run_with_cache, every hook point) and the sweep, as a notebook does it."""
    from transformer_lens import patching

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, target] - logits[0, -1, distractor]

    with torch.no_grad():
        clean_logits, clean_cache = bridge.run_with_cache(clean)
        grid = getattr(patching, function)(bridge, corrupt, clean_cache, metric)
    return {"grid": grid.double().numpy(), "clean": float(metric(clean_logits))}


# --- measuring ---------------------------------------------------------------------------------------


def compare(tdbql: dict, tl: dict) -> dict:
    """Max |difference| of every cell, and the effect range it should be read against."""
    a, b = tdbql["grid"], tl["grid"]
    if a.shape != b.shape:
        return {"equal_shapes": False, "tdbql_shape": list(a.shape), "tl_shape": list(b.shape)}
    return {"equal_shapes": True, "cells": int(a.size),
            "max_abs_diff_metric_patched": float(np.abs(a - b).max()),
            "max_abs_diff_metric_clean": abs(tdbql["clean"] - tl["clean"]),
            "effect_range": float(np.abs(b - tdbql["corrupt"]).max()),  # largest |patched - corrupt|
            "metric_clean": tdbql["clean"], "metric_corrupt": tdbql["corrupt"]}


def agrees(comparison: dict, atol: float) -> bool:
    return comparison.get("equal_shapes", False) and max(
        comparison["max_abs_diff_metric_patched"], comparison["max_abs_diff_metric_clean"]) <= atol


def timed(runs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """One warm-up call of each runner, then `repeats` rounds, the runners interleaved so that they
    share the machine's load; wall seconds and process CPU seconds (all threads) per call."""
    results = {name: run() for name, run in runs.items()}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(round(time.perf_counter() - start, 4))
            cpu[name].append(round(time.process_time() - start_cpu, 4))
    return results, wall, cpu


def environment() -> dict:
    from importlib.metadata import version

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": version("transformers"),
            "transformer_lens": version("transformer-lens"), "tdbql": version("tdbql"),
            "load_average_before": os.getloadavg()}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = make_checkpoint(args.shape, Path(args.data))
    session = tdbql_session(folder)
    sessions = {"tdbql": session} | ({"tdbql_batch_size_1": tdbql_session(folder, 1)} if args.batch_size_1 else {})
    bridge = tl_bridge(folder)
    loaded = session.loaded
    ids = [loaded.encode(text) for text in (CLEAN, CORRUPT)]
    assert len(ids[0]) == len(ids[1]), "the bench needs a clean/corrupt pair of equal token length"
    clean, corrupt = (torch.tensor([x]) for x in ids)
    target, distractor = (loaded.encode(word)[0] for word in (TARGET, DISTRACTOR))
    cfg = loaded.config
    report = {"environment": environment(),
              "model": {"shape": args.shape, **SHAPES[args.shape], "folder": str(folder)},
              "prompt": {"clean": CLEAN, "corrupt": CORRUPT, "tokens": len(ids[0]), "clean_ids": ids[0],
                         "corrupt_ids": ids[1], "target": [TARGET, target], "distractor": [DISTRACTOR, distractor]},
              "atol": args.atol, "repeats": args.repeats,
              "tdbql_batch_size": {name: tdbql_batch_size(s) for name, s in sessions.items()}, "sweeps": {}}
    for name, (query, function, axis) in SWEEPS.items():
        shape = (cfg.n_layers, len(ids[0]) if axis == "position" else cfg.n_heads)
        runs = {key: partial(tdbql_sweep, s, query, axis, shape) for key, s in sessions.items()}
        runs["tl"] = partial(tl_sweep, bridge, function, clean, corrupt, target, distractor)
        results, seconds, cpu_seconds = timed(runs, args.repeats)
        median = {key: statistics.median(values) for key, values in seconds.items()}
        comparisons = {key: compare(results[key], results["tl"]) for key in sessions}
        report["sweeps"][name] = {
            "tdbql_query": query, "tl_function": f"transformer_lens.patching.{function}", "grid_shape": list(shape),
            "tl_forwards": int(np.prod(shape)) + 1, "comparison": comparisons["tdbql"],
            "equal": all(agrees(c, args.atol) for c in comparisons.values()),
            "seconds": seconds, "median_seconds": median, "cpu_seconds": cpu_seconds,
            "load_average_after": os.getloadavg(),
            "ratios": {f"{key}/tl": round(median[key] / median["tl"], 3) for key in sessions},
            "ratios_of_min": {f"{key}/tl": round(min(seconds[key]) / min(seconds["tl"]), 3) for key in sessions}}
        if args.batch_size_1:
            report["sweeps"][name]["comparison_batch_size_1"] = comparisons["tdbql_batch_size_1"]
    report["environment"]["load_average_after"] = os.getloadavg()
    return report


def print_summary(report: dict) -> None:
    print(f"{'sweep':24s} {'cells':>6s} {'max |diff|':>11s} {'effect':>9s} {'tdbql s':>8s} {'TL s':>8s} tdbql/TL")
    for name, sweep in report["sweeps"].items():
        c, m = sweep["comparison"], sweep["median_seconds"]
        diff, effect = (c.get(k, float("nan")) for k in ("max_abs_diff_metric_patched", "effect_range"))
        print(f"{name:24s} {c.get('cells', 0):6d} {diff:11.2e} {effect:9.2e} {m['tdbql']:8.3f} {m['tl']:8.3f} "
              f"{sweep['ratios']['tdbql/tl']}" + ("" if sweep["equal"] else "   NOT EQUAL"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", dest="shape", action="store_const", const="small", default="gpt2-small",
                        help="2 layers, d_model 64 (the test's size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest |tdbql - TL| allowed per cell (fp32)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-batch-size-1", dest="batch_size_1", action="store_false",
                        help="skip tdbql with `set batch_size = 1`")
    parser.add_argument("--data", default=str(DATA), help="where the random checkpoint is built")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/cpu-patching-sweeps.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {"command": " ".join(["bench/patching_sweeps.py", *(sys.argv[1:] if argv is None else argv)])}
    report |= run(args)
    out = Path(args.out or REPO / "bench" / "results" / "cpu-patching-sweeps.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    print(f"written to {out}")
    return 0 if all(s["equal"] for s in report["sweeps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
