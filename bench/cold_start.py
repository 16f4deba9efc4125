"""Cold start: a fresh process running the README's first query, against `python -c "import torch"`
in the same run (the floor no torch program can go below), and the same query with `--compile`
from an empty inductor cache (what a first `--compile` query costs on this machine).

    python bench/cold_start.py --out bench/results/cpu-cold-start.json
    python bench/cold_start.py --repeats 1 --no-compile      # the test's rehearsal

Runs are interleaved (torch, tdbql, torch, tdbql, ...) so machine load hits both alike; the figure
is the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERY = 'prompt "When Mary and John went to the store, John gave a drink to"; target " Mary" vs " John"; ' \
        'topk 10 act_times_grad'


def wall(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed:\n{proc.stderr[-2000:]}")
    return seconds


def tdbql_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "tdbql.shell.cli", *flags, "-c", QUERY]


def run(repeats: int, compile_too: bool) -> dict:
    torch_s, tdbql_s = [], []
    for _ in range(repeats):
        torch_s.append(wall([sys.executable, "-c", "import torch"]))
        tdbql_s.append(wall(tdbql_argv()))
    result = {
        "query": QUERY,
        "repeats": repeats,
        "import_torch_s": torch_s,
        "tdbql_first_query_s": tdbql_s,
        "median_import_torch_s": statistics.median(torch_s),
        "median_tdbql_first_query_s": statistics.median(tdbql_s),
        "ratio_tdbql_to_import_torch": statistics.median(tdbql_s) / statistics.median(torch_s),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    if compile_too:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
            result["tdbql_compile_first_query_empty_cache_s"] = wall(tdbql_argv("--compile"), env)
            result["tdbql_compile_first_query_warm_cache_s"] = wall(tdbql_argv("--compile"), env)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the --compile runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.repeats, not args.no_compile)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
