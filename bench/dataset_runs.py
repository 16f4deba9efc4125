"""Dataset runs: tokens/s of one query file over N prompts, one process vs `tdbql run`, one run.

Contenders, on the same dataset (IOI prompts of four templates, each with its own target and
distractor, as one Parquet file) and the same run file:

- one_process: a `Session`, what `tdbql -f q.tql` does: `prompts from 'data.parquet'`, then the
  queries, on `--threads` torch threads (default 1: on a shared 2-core machine two OpenMP threads
  spin against other work, and one process's time varied 10x from run to run; with one thread,
  `--workers 2` measures what a second worker buys);
- local: `tdbql run --engine local`: the same in one process, shard by shard, to Parquet;
- ray: `tdbql run --engine ray --workers W` on a local Ray (one CPU and one torch thread per
  actor). Ray is started first and timed apart (`ray_init_seconds`); the run's own time includes
  starting the actors and loading the model in each.

The three run `--repeats` rounds, interleaved (each round in a rotated order), and the medians
are reported, with the load average before every run: on a shared machine the load of other
work moves single runs by several times.

Every table must be the same across the three (rows sorted; RTOL below); the script exits 1 otherwise. Tokens
are the prompts' tokens (the `prompts` table's n_tokens), the same for every contender.

    python bench/dataset_runs.py                  # 2,000 prompts, 2 workers -> bench/results/cpu-datasets.json
    python bench/dataset_runs.py --prompts 48 --shard-rows 16 --batch-size 8 --workers 1 --repeats 1 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Mary", "John", "Anna", "Bob", "Tom", "Alice", "Sarah", "James"]
TEMPLATES = [
    "When {a} and {b} went to the store, {b} gave a drink to",
    "When {a} and {b} went to the park, {b} gave a ball to",
    "Then {a} and {b} went to the office, and {b} gave a book to",
    "{a} and {b} went to the store. {b} gave a drink to",
]
QUERIES = [
    "topk 20 act_times_grad by prompt as per_prompt",  # W4's query: every prompt's top nodes
    "topk 20 act_times_grad as top",  # a global ranking: merged across shards
    "logits where token = -1 topk 5 as next",
]
TABLES = ["per_prompt", "top", "next"]
# Ray's one-CPU actors run torch on one thread, one process on all cores: a matrix product summed in
# another order can move a float's last bits, so results are "the same" to float32 rounding (and every
# id, rank and text column equal); `bitwise_equal` says where they are equal to the bit.
RTOL = 1e-5


def write_dataset(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        rows.append({"prompt": TEMPLATES[i % len(TEMPLATES)].format(a=a, b=b), "target": f" {a}",
                     "distractor": f" {b}", "pair": i})
    pq.write_table(pa.Table.from_pylist(rows), path)


def one_process(data: Path, query: Path, batch_size: int) -> tuple[float, dict[str, pa.Table], int]:
    from tdbql.shell.session import Session

    started = time.perf_counter()
    session = Session(batch_size=batch_size)
    try:
        session.execute(f"prompts from '{data}'")
        session.execute(query.read_text())
        seconds = time.perf_counter() - started
        tables = {t: session.con.sql(f"SELECT * FROM {t} ORDER BY ALL").to_arrow_table() for t in TABLES}
        tokens = session.con.sql("SELECT sum(n_tokens) FROM prompts").fetchall()[0][0]
    finally:
        session.close()
    return seconds, tables, int(tokens)


def run(data: Path, query: Path, out: Path, args, engine: str) -> tuple[float, dict[str, pa.Table], object]:
    from tdbql.shell.run.attach import attach_run
    from tdbql.shell.run.driver import RunOptions, run_dataset

    started = time.perf_counter()
    summary = run_dataset(RunOptions(query_file=str(query), prompts=str(data), out=str(out), engine=engine,
                                     workers=args.workers if engine == "ray" else None,
                                     shard_rows=args.shard_rows))
    seconds = time.perf_counter() - started
    con = duckdb.connect()
    attach_run(con, out)
    return seconds, {t: con.sql(f"SELECT * FROM {t} ORDER BY ALL").to_arrow_table() for t in TABLES}, summary


def difference(got: pa.Table, expected: pa.Table) -> float:
    """The largest relative difference of a float column; inf where anything else differs."""
    if got.schema != expected.schema or got.num_rows != expected.num_rows:
        return math.inf
    worst = 0.0
    for a, b in zip(got.columns, expected.columns):
        if not pa.types.is_floating(a.type):
            if not a.equals(b):
                return math.inf
            continue
        x, y = a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False)
        scale = np.maximum(np.maximum(np.abs(x), np.abs(y)), 1e-6)
        worst = max(worst, float(np.max(np.abs(x - y) / scale, initial=0.0)))
    return worst


def contenders(data: Path, query: Path, tmp: Path, args) -> dict:
    """name -> a function of the round that runs the contender: (seconds, tables, summary line)."""
    def one(_round: int):
        seconds, tables, _ = one_process(data, query, args.batch_size)
        return seconds, tables, None

    def engine(name: str):
        def go(round_: int):
            seconds, tables, summary = run(data, query, tmp / f"{name}-{round_}", args, name)
            return seconds, tables, summary.line()
        return go

    return {"one_process": one, "local": engine("local"), "ray": engine("ray")}


def rounds(runners: dict, repeats: int) -> tuple[dict, dict]:
    """Every contender once per round, in a rotated order (so none is always first or last on a
    shared machine); each time with the load average before it. Returns the times and round 0's tables."""
    names, times, tables = list(runners), {name: [] for name in runners}, {}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            load = os.getloadavg()[0]
            seconds, got, summary = runners[name](round_)
            times[name].append({"seconds": seconds, "load_1min_before": load, "summary": summary})
            tables.setdefault(name, got)
            print(f"round {round_} {name:12} {seconds:7.1f} s (load {load:.1f})", flush=True)
    return times, tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="divides --shard-rows: the same batches everywhere")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three contenders; medians are reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of one process (and local); each Ray actor has one (its one CPU)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu-datasets.json"))
    args = parser.parse_args(argv)
    if args.shard_rows % args.batch_size:
        parser.error("--batch-size must divide --shard-rows")
    import ray
    import torch

    torch.set_num_threads(args.threads)
    report: dict = {
        "command": "python bench/dataset_runs.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "torch_threads": torch.get_num_threads(),
                    "note": "a shared machine: other work runs beside the bench; the load averages say how much"},
        "prompts": args.prompts, "shard_rows": args.shard_rows, "batch_size": args.batch_size,
        "workers": args.workers, "repeats": args.repeats, "queries": QUERIES,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, query = tmp / "data.parquet", tmp / "q.tql"
        write_dataset(data, args.prompts)
        query.write_text(f"set batch_size = {args.batch_size}\n" + "\n".join(QUERIES) + "\n")
        started = time.perf_counter()
        ours = not ray.is_initialized()
        if ours:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        report["ray_init_seconds"] = time.perf_counter() - started
        try:
            times, tables = rounds(contenders(data, query, tmp, args), args.repeats)
        finally:
            if ours:
                ray.shutdown()
        expected = tables["one_process"]
        prompts = tmp / "local-0" / "prompts" / "*.parquet"  # the prompts' tokens, the same for every contender
        report["tokens"] = tokens = int(duckdb.sql(f"SELECT sum(n_tokens) FROM '{prompts}'").fetchall()[0][0])
    results = {name: {"median_seconds": statistics.median(t["seconds"] for t in ts), "runs": ts}
               for name, ts in times.items()}
    for r in results.values():
        r["tokens_per_s"] = tokens / r["median_seconds"]
        r["prompts_per_s"] = args.prompts / r["median_seconds"]
    base = results["one_process"]["tokens_per_s"]
    report["results"] = results
    report["ratios"] = {
        "ray/one_process (tokens/s)": results["ray"]["tokens_per_s"] / base,
        "ray with ray.init/one_process (tokens/s)":
            tokens / (results["ray"]["median_seconds"] + report["ray_init_seconds"]) / base,
        "local/one_process (tokens/s)": results["local"]["tokens_per_s"] / base,
    }
    report["bitwise_equal"] = {t: {name: tables[name][t].equals(expected[t]) for name in ("local", "ray")}
                               for t in TABLES}
    report["max_relative_difference"] = {t: {name: difference(tables[name][t], expected[t])
                                             for name in ("local", "ray")} for t in TABLES}
    same = {t: {name: d <= RTOL for name, d in ds.items()} for t, ds in report["max_relative_difference"].items()}
    report["same_results"] = same
    report["rows"] = {t: expected[t].num_rows for t in TABLES}
    report["machine"]["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:12} {r['median_seconds']:7.1f} s  {r['tokens_per_s']:8.0f} tokens/s  "
              f"{r['prompts_per_s']:6.1f} prompts/s (median of {args.repeats})")
    print(f"ray.init {report['ray_init_seconds']:.1f} s; ratios: "
          + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    print(f"same results: {same}")
    return 0 if all(v for t in same.values() for v in t.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
