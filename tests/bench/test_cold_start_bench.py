"""The cold-start benchmark runs once without --compile: both processes succeed and the figures are
positive (timings are reported in docs/performance.md, never asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "cold_start.py"


def test_cold_start_bench_runs():
    spec = importlib.util.spec_from_file_location("cold_start_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(repeats=1, compile_too=False)
    assert result["median_import_torch_s"] > 0 and result["median_tdbql_first_query_s"] > 0
    assert "tdbql_compile_first_query_empty_cache_s" not in result
