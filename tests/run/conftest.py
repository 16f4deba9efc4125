"""Fixtures for dataset runs: a prompts dataset in three formats and the one-process answer.

The dataset is IOI prompts of several templates and lengths, each with its own target and
distractor, a corrupted twin (the names swapped where the answer is decided) and extra columns
(`template`, `pair`). Its rows are split across a JSONL file, a Parquet file (small row groups)
and a CSV file, so shards span files and row groups; `all.jsonl` holds the same rows in one file
for the one-process session the runs are compared with.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.shell.conftest import cli_env, tdbql_bin  # noqa: F401  (the console script, a clean environment)

NAMES = ["Mary", "John", "Anna", "Bob", "Tom", "Alice", "Sarah", "James"]
TEMPLATES = [
    "When {a} and {b} went to the store, {b} gave a drink to",
    "When {a} and {b} went to the park, {b} gave a ball to",
    "Then {a} and {b} went to the office, and {b} gave a book to",
    "{a} and {b} went to the store. {b} gave a drink to",
]
BATCH = 16  # the batch size of every run and of the one-process session: it divides SHARD_ROWS
SHARD_ROWS = 64
N_ROWS = 160  # 3 shards: 64 (JSONL and Parquet), 64 (Parquet), 32 (Parquet and CSV)


def ioi_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        t = i % len(TEMPLATES)
        template = TEMPLATES[t]
        rows.append({"prompt": template.format(a=a, b=b), "target": f" {a}", "distractor": f" {b}",
                     "corrupt": template.format(a=b, b=a), "template": f"t{t}", "pair": i})
    return rows


def write_dataset(folder: Path, rows: list[dict]) -> Path:
    """rows[:60] as JSONL (with a blank line), rows[60:130] as Parquet (row groups of 32, `pair`
    an int64 there), the rest as CSV (one prompt with a comma and a quote, so fields are quoted)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "a.jsonl").open("w") as f:
        for i, row in enumerate(rows[:60]):
            f.write(json.dumps(row) + "\n")
            if i == 10:
                f.write("\n")
    pq.write_table(pa.Table.from_pylist(rows[60:130]), folder / "b.parquet", row_group_size=32)
    with (folder / "c.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[130:])
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The embedded model's batches run fastest on one thread on a shared 2-core machine (as
    Ray's one-CPU actors run them); the thread count does not change the results."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def rows() -> list[dict]:
    rows = ioi_rows(N_ROWS)
    rows[135]["prompt"] = 'Then "Mary", and John went to the store, John gave a drink to'
    rows[135]["corrupt"] = 'Then "John", and Mary went to the store, Mary gave a drink to'
    return rows


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, rows) -> Path:
    folder = write_dataset(tmp_path_factory.mktemp("dataset") / "data", rows)
    with (folder.parent / "all.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


def write_query(folder: Path, text: str, name: str = "q.tql") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tables_of(out: Path, names) -> dict[str, pa.Table]:
    """The run's tables as DuckDB reads them after `.attach`, rows sorted."""
    from tdbql.shell.run.attach import attach_run

    con = duckdb.connect()
    attach_run(con, out)
    return {name: con.sql(f"SELECT * FROM {name} ORDER BY ALL").to_arrow_table() for name in names}


def session_tables(dataset: Path, queries: list[str], names) -> dict[str, pa.Table]:
    """The one-process answer: a Session over all.jsonl running the same queries."""
    from tdbql.shell.session import Session

    session = Session(batch_size=BATCH)
    try:
        session.execute(f"prompts from '{dataset.parent / 'all.jsonl'}'")
        for query in queries:
            session.execute(query)
        return {name: session.con.sql(f"SELECT * FROM {name} ORDER BY ALL").to_arrow_table() for name in names}
    finally:
        session.close()
