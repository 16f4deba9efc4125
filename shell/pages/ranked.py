"""The ranked table page, for every other result: sortable columns, a bar in each value cell, and
the row's token in its prompt on hover. Plain HTML and a short script: a table needs no plotting
library."""

from __future__ import annotations

import pyarrow as pa

from ..display import KEY_COLUMNS, is_numeric, rows_of

MAX_ROWS = 5000


def value_columns(table: pa.Table) -> list[str]:
    """The numeric columns that are values (they get bars), not keys."""
    return [field.name for field in table.schema if is_numeric(field.type) and field.name not in KEY_COLUMNS]


def page_data(table: pa.Table, prompts: dict[int, list[str]]) -> dict:
    """The rows (at most MAX_ROWS) and, for the hover, each prompt's tokens (`prompts`: prompt_id
    -> tokens in order) where the rows name a prompt and a position."""
    rows = rows_of(table.slice(0, MAX_ROWS))
    note = f"first {MAX_ROWS} of {table.num_rows} rows" if table.num_rows > MAX_ROWS else f"{table.num_rows} rows"
    named = {r.get("prompt_id") for r in rows if r.get("position") is not None}
    return {"columns": table.column_names, "values": value_columns(table), "rows": rows, "note": note,
            "prompts": {str(p): tokens for p, tokens in prompts.items() if p in named}}
