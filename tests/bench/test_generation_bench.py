"""The generation benchmark runs at a tiny size: the cached loop, the cacheless loop and
transformers' generate agree token for token (timings are reported, never asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "generation.py"


def test_generation_bench_agrees_with_itself_and_transformers():
    spec = importlib.util.spec_from_file_location("generation_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(small=True, tokens=8, repeats=1)
    assert result["same_tokens"] is True
    assert set(result["seconds"]) == {"tdbql_kv_cache", "tdbql_no_cache", "transformers_generate"}
    assert all(s > 0 for s in result["seconds"].values())
