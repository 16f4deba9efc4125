"""The session's own DuckDB tables: `queries`, `prompts`, `tokens`, `corrupt_tokens`, the result
tables and the view `_`.

Every change that spans tables commits in one transaction, so a crash (kill -9, Ctrl-C, an
error half way) leaves the previous state: the prompt set's three tables together; a result
table, `_` and its `queries` row together. Inside a transaction the user opened with `begin`,
the writes join it (the user's `commit` or `rollback` decides). A session table the user dropped
is recreated before the next statement that writes it; one the user replaced with something of
another shape is refused with a message that says how to get it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import duckdb
import pyarrow as pa

from ..query.errors import TdbqlError
from .text import quote_ident

QUERIES_COLUMNS = (("query_id", "BIGINT"), ("text", "VARCHAR"), ("plan_json", "VARCHAR"), ("model", "VARCHAR"),
                   ("started_at", "TIMESTAMP"), ("elapsed_ms", "DOUBLE"), ("rows", "BIGINT"),
                   ("table_name", "VARCHAR"))
QUERIES_DDL = f"CREATE TABLE IF NOT EXISTS queries ({', '.join(f'{n} {t}' for n, t in QUERIES_COLUMNS)})"
PROMPT_TABLES = ("prompts", "tokens", "corrupt_tokens")
RESERVED_TABLES = frozenset({*PROMPT_TABLES, "queries", "_"})
_ARROW_VIEW = "_tdbql_arrow_in"


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection, joined: bool = False) -> Iterator[None]:
    """Commit what the block writes together, or nothing of it; `joined`: the user's own `begin`
    is open, so the block joins it (DuckDB cannot nest, nor tell whether one is open)."""
    if joined:
        yield
        return
    con.begin()
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    con.commit()


def table_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Tables and views of the main schema, sorted."""
    rel = con.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
                  "ORDER BY table_name")
    return [r[0] for r in rel.fetchall()]


def store(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    """CREATE OR REPLACE TABLE name AS SELECT * FROM the Arrow table."""
    con.register(_ARROW_VIEW, table)
    try:
        con.execute(f"CREATE OR REPLACE TABLE {quote_ident(name)} AS SELECT * FROM {_ARROW_VIEW}")
    finally:
        con.unregister(_ARROW_VIEW)


def store_all(con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table], joined: bool = False) -> None:
    with transaction(con, joined):
        for name, table in tables.items():
            store(con, name, table)


def ensure_queries(con: duckdb.DuckDBPyConnection) -> None:
    """`queries` as the session keeps it: recreated (empty) when dropped; refused when the name
    now holds something else."""
    rel = con.execute("SELECT column_name, data_type FROM information_schema.columns "
                      "WHERE table_schema = 'main' AND table_name = 'queries' ORDER BY ordinal_position")
    columns = tuple(rel.fetchall())
    if not columns:
        con.execute(QUERIES_DDL)
        return
    kind = con.execute("SELECT table_type FROM information_schema.tables WHERE table_schema = 'main' "
                       "AND table_name = 'queries'").fetchall()
    if columns != QUERIES_COLUMNS or kind != [("BASE TABLE",)]:
        have = ", ".join(f"{n} {t}" for n, t in columns)
        raise TdbqlError(f"the session keeps one row per model query in table queries, which now holds ({have}); "
                         "rename or drop it (`drop table queries` / `drop view queries`) and the session "
                         "recreates it")


def next_query_id(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.sql("SELECT coalesce(max(query_id), 0) + 1 FROM queries").fetchall()[0][0])


def save_result(con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table], shown: str, record: tuple,
                joined: bool = False) -> None:
    """A model query's tables, `_` over the shown one, and its `queries` row, in one transaction.
    `record` is the row: (query_id, text, plan_json, model, started_at, elapsed_ms, rows, names)."""
    with transaction(con, joined):
        for name, table in tables.items():
            store(con, name, table)
        con.execute(f"CREATE OR REPLACE VIEW _ AS SELECT * FROM {quote_ident(shown)}")
        con.execute(f"INSERT INTO queries VALUES ({', '.join('?' * len(QUERIES_COLUMNS))})", list(record))


def query_record(query_id: int, text: str, query, model: str, started_at: datetime, elapsed_ms: float,
                 rows: int, names: list[str]) -> tuple:
    return (query_id, text.strip(), query.model_dump_json(), model, started_at, elapsed_ms, rows, ",".join(names))


def check_result_name(name: str | None) -> None:
    if name is not None and name.lower() in RESERVED_TABLES:
        raise TdbqlError(f"'{name}' is a session table; name the result something else")
