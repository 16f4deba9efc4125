"""Render Arrow tables as text: table (rich), csv, json, markdown.

Pure functions from a `pyarrow.Table` to a string, so the REPL, the CLI and `.output` share them.
Only the `table` mode limits rows (like pgcli's row_limit); the export modes write every row.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from decimal import Decimal

import pyarrow as pa
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

FORMATS: tuple[str, ...] = ("table", "csv", "json", "markdown")
DEFAULT_MAX_ROWS = 40
NATURAL_WIDTH = 10_000


def format_table(table: pa.Table, mode: str = "table", *, max_rows: int | None = DEFAULT_MAX_ROWS,
                 width: int | None = None, color: bool = False) -> str:
    """Render `table` in `mode` (one of FORMATS). `max_rows` applies to `table` and `markdown`."""
    if mode == "table":
        return _rich_table(table, max_rows=max_rows, width=width, color=color)
    if mode == "csv":
        return _csv(table)
    if mode == "json":
        return _json(table)
    if mode == "markdown":
        return _markdown(table, max_rows=max_rows)
    raise ValueError(f"unknown format {mode!r}; expected one of {', '.join(FORMATS)}")


def format_cell(value: object) -> str:
    """Human-readable cell text: 4 significant digits for floats, NULL for missing values."""
    if value is None:
        return "NULL"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_cell(v) for v in value) + "]"
    return str(value)


def _visible_token(text: str) -> str:
    """Make token text readable in a cell: leading spaces and newlines shown, quoted."""
    return repr(text)


def _display_rows(table: pa.Table, max_rows: int | None) -> tuple[list[list[str]], int]:
    shown = table if max_rows is None else table.slice(0, max_rows)
    token_cols = {i for i, name in enumerate(shown.column_names) if name in ("token", "attended_token", "text")}
    rows = []
    for record in shown.to_pylist():
        row = []
        for i, value in enumerate(record.values()):
            if i in token_cols and isinstance(value, str) and value != value.strip():
                row.append(_visible_token(value))
            else:
                row.append(format_cell(value))
        rows.append(row)
    return rows, table.num_rows - shown.num_rows


def _footer(total: int, hidden: int) -> str:
    if hidden:
        return f"({total} rows, {total - hidden} shown; use .mode csv or SQL LIMIT/OFFSET to see more)"
    return f"({total} row{'s' if total != 1 else ''})"


def _rich_table(table: pa.Table, *, max_rows: int | None, width: int | None, color: bool) -> str:
    rows, hidden = _display_rows(table, max_rows)
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) for t in table.schema.types]
    out = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for name, is_num in zip(table.column_names, numeric):
        out.add_column(name, justify="right" if is_num else "left", overflow="fold")
    for row in rows:
        out.add_row(*row)
    buf = io.StringIO()
    # no width: the table's natural width (wide tables go to the pager, which scrolls sideways)
    console = Console(file=buf, width=width or NATURAL_WIDTH, force_terminal=color, no_color=not color,
                      color_system="standard" if color else None, highlight=False)
    console.print(out)
    console.print(_footer(table.num_rows, hidden))
    return buf.getvalue().rstrip("\n")


def _csv(table: pa.Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.column_names)
    for record in table.to_pylist():
        writer.writerow(["" if v is None else v for v in record.values()])
    return buf.getvalue().rstrip("\n")


def _json_safe(value: object) -> object:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _json(table: pa.Table) -> str:
    """A JSON array of row objects (duckdb's `.mode json`); NaN and inf become null."""
    records = [{k: _json_safe(v) for k, v in r.items()} for r in table.to_pylist()]
    return json.dumps(records, ensure_ascii=False)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _markdown(table: pa.Table, *, max_rows: int | None) -> str:
    rows, hidden = _display_rows(table, max_rows)
    lines = [_md_row(table.column_names), _md_row(["---"] * table.num_columns)]
    lines += [_md_row(r) for r in rows]
    if hidden:
        lines.append("")
        lines.append(_footer(table.num_rows, hidden))
    return "\n".join(lines)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_escape(c) for c in cells) + " |"


def render_result(result, *, mode: str = "table", max_rows: int | None = DEFAULT_MAX_ROWS, timer: bool = False,
                  width: int | None = None, color: bool = False) -> str:
    """What the shell prints for one `StatementResult`: its table, its message, its time."""
    parts = []
    if result.table is not None:
        parts.append(format_table(result.table, mode, max_rows=max_rows, width=width, color=color))
    if result.message:
        parts.append(result.message)
    if timer:
        parts.append(f"Run Time: {result.elapsed_ms / 1000:.3f} s")
    return "\n".join(parts)


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
