"""Render Arrow tables as text: table and line (for people, `display.py`), csv, json, jsonl,
markdown (complete: every row, every column, nothing shortened); parquet is written to a file.

Pure functions from a `pyarrow.Table`, so the REPL, the CLI and `.output` share them. Only the
table and line modes limit rows (like pgcli's row_limit).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from ..query.errors import TdbqlError
from .display import format_cell, line_text, python_values, table_text, token_text, unique_names

FORMATS: tuple[str, ...] = ("table", "line", "csv", "json", "jsonl", "markdown", "parquet")
HUMAN_FORMATS = frozenset({"table", "line"})
FILE_ONLY_FORMATS = frozenset({"parquet"})
EXTENSION_FORMATS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
                                     ".parquet": "parquet", ".md": "markdown"}
DEFAULT_MAX_ROWS = 40
MAX_ROWS_LIMIT = 1_000_000_000

__all__ = ["FORMATS", "format_cell", "format_for_path", "format_table", "write_parquet"]


def format_table(table: pa.Table, mode: str = "table", *, max_rows: int | None = DEFAULT_MAX_ROWS,
                 width: int | None = None, expanded: bool = False) -> str:
    """Render `table` in `mode` (one of FORMATS but parquet). `max_rows` and `width` apply to the
    table and line modes; `expanded` shows the table mode as lines."""
    if mode == "table" and not expanded:
        return table_text(table, max_rows=max_rows, width=width)
    if mode in ("table", "line"):
        return line_text(table, max_rows=max_rows)
    if mode == "csv":
        return _csv(table)
    if mode == "json":
        return json.dumps(_records(table), ensure_ascii=False)
    if mode == "jsonl":
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in _records(table))
    if mode == "markdown":
        return _markdown(table)
    if mode == "parquet":
        raise TdbqlError("parquet is written to a file: .output FILE.parquet, .once FILE.parquet or -o FILE.parquet")
    raise ValueError(f"unknown format {mode!r}; expected one of {', '.join(FORMATS)}")


def format_for_path(path: Path) -> str | None:
    """The format a file's extension names (.csv, .json, .jsonl, .parquet, .md), if any."""
    return EXTENSION_FORMATS.get(path.suffix.lower())


def write_parquet(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq  # only for parquet output

    try:
        pq.write_table(table, path)
    except OSError as exc:
        raise TdbqlError(f"cannot write '{path}': {exc}") from exc


def _columns(table: pa.Table) -> list[list]:
    return [python_values(table.column(i)) for i in range(table.num_columns)]


def _csv(table: pa.Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in zip(*_columns(table)):
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue().rstrip("\n")


def _json_safe(value: object) -> object:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _records(table: pa.Table) -> list[dict]:
    """Row objects (duckdb's `.mode json`); NaN and inf become null."""
    names = unique_names(table).column_names  # a repeated name would lose a column
    return [{n: _json_safe(v) for n, v in zip(names, row)} for row in zip(*_columns(table))]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _markdown(table: pa.Table) -> str:
    names = table.column_names
    tokens = [n in ("token", "attended_token", "text") for n in names]
    lines = [_md_row(names), _md_row(["---"] * table.num_columns)]
    for row in zip(*_columns(table)):
        lines.append(_md_row([token_text(v) if t else format_cell(v) for v, t in zip(row, tokens)]))
    return "\n".join(lines)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_escape(c) for c in cells) + " |"


class ProgressBar:
    """A `progress(done, total)` callback drawing a rich bar on stderr, only on a terminal and
    only for work of more than one batch."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 1:
            return
        if self._progress is None:
            self._start(total)
        self._progress.update(self._task, completed=done, total=total)
        if done >= total:
            self.close()

    def _start(self, total: int) -> None:
        self._progress = Progress("batches", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task("batches", total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
