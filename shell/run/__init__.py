"""Dataset runs: a query file over a prompts dataset, sharded, resumable, results as Parquet.

    tdbql run -f query.tql --prompts 'data/*.parquet' --out results/ [--engine local|ray]

The modules, in the order they build on each other:

- `dataset.py`  — the prompt files (a glob, a folder or a file; Parquet, JSONL, CSV): their
  columns checked, rows counted, and a row range read back with each malformed row named by
  file and row;
- `shards.py`   — the shard plan (row ranges of one file, global prompt ids), the output layout,
  atomic commits and the manifest that makes a run resumable;
- `queries.py`  — the run file: setup statements, the queries, their table names, and how each
  result combines across shards (or why it cannot);
- `merge.py`    — the cross-shard reductions, pure functions: global top-k, `over prompts`
  partial sums, counts and maxima, metric and patching reductions;
- `worker.py`   — one shard: read, validate, run every query, write its files (both engines);
- `local.py`, `ray_engine.py` — the two engines around the worker;
- `driver.py`   — plan, resume, run an engine, commit, merge, summarise;
- `explain.py`, `attach.py`, `cli.py` — `--explain`, DuckDB views over a run, `tdbql run`.
"""
