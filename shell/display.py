"""Tables for people: the `table` and `line` modes (display only; the DuckDB table keeps every column).

A node table (columns component, layer, unit) leads with a compact node id and the tokens, then
its values: `attn[1,0]@13→1  ' to'→' Mary'  9.61`. Columns that are NULL in every row are left
out (the footer names them). Given a width, the table fits it: long text cells are shortened
first, then the last columns are hidden (the footer names them; `.mode line` or `\\x` shows all).
A cell never shows more than CELL_LIMIT characters, so a huge value cannot stall the terminal.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

CELL_LIMIT = 200
GAP = "  "
TEXT_WIDTH = 24  # long text is shortened to this before columns are hidden
MIN_TEXT_WIDTH = 12  # and to this when hiding is not enough
NODE_COLUMNS = ("component", "layer", "unit")
FOLDED = frozenset({"component", "layer", "unit", "position", "attended", "token", "attended_token"})
TOKEN_COLUMNS = frozenset({"token", "attended_token", "text"})
KEY_COLUMNS = frozenset({"prompt_id", "layer", "unit", "position", "attended", "rank", "vocab_id", "query_id",
                         "head", "src_position", "dst_position", "token_id"})
PRIMARY_VALUES = ("recovered",)  # a patching table's answer leads its values


@dataclass
class Column:
    name: str
    cells: list[str]
    numeric: bool
    keep: bool = False  # never hidden to fit a width

    @property
    def width(self) -> int:
        return max([len(self.name), *(len(c) for c in self.cells)])


# --- cells ---------------------------------------------------------------------------------------


def cap(text: str, limit: int = CELL_LIMIT) -> str:
    """At most `limit` characters, with a marker saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


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


def token_text(value: object) -> str:
    """A token as it reads in a cell: quoted when spaces or newlines at its ends would be invisible."""
    if isinstance(value, str) and (value != value.strip() or not value):
        return repr(value)
    return format_cell(value)


def python_values(column: pa.ChunkedArray | pa.Array) -> list:
    """The column as Python values; values Python cannot hold (DuckDB's infinite timestamps and
    dates) become 'infinity' / '-infinity' or Arrow's own text instead of raising."""
    try:
        return column.to_pylist()
    except (OverflowError, ValueError):
        return [_scalar_value(scalar) for scalar in column]


def unique_names(table: pa.Table) -> pa.Table:
    """The table with a repeated column name (`select 1 as layer, 2 as layer`) made unique for
    display as DuckDB's own tables do (`layer`, `layer_1`); columns are looked up by name."""
    seen: set[str] = set()
    names = []
    for name in table.column_names:
        unique, k = name, 0
        while unique in seen:
            k += 1
            unique = f"{name}_{k}"
        seen.add(unique)
        names.append(unique)
    return table if names == table.column_names else table.rename_columns(names)


def _head(table: pa.Table, max_rows: int | None) -> pa.Table:
    return unique_names(table if max_rows is None else table.slice(0, max_rows))


def rows_of(table: pa.Table) -> list[dict]:
    table = unique_names(table)
    columns = {name: python_values(table.column(name)) for name in table.column_names}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def first_prompt(rows: list[dict]) -> tuple[list[dict], str]:
    """The rows of the first prompt, and a note naming it when the table has several."""
    prompts = sorted({r.get("prompt_id") for r in rows}, key=lambda p: (p is None, p))
    if len(prompts) <= 1:
        return rows, "" if prompts[0] is None else f"prompt {prompts[0]}"
    chosen = prompts[0]
    kept = [r for r in rows if r.get("prompt_id") == chosen]
    return kept, f"prompt {chosen} (1 of {len(prompts)} prompts; filter with SQL for another)"


def _scalar_value(scalar: pa.Scalar) -> object:
    try:
        return scalar.as_py()
    except (OverflowError, ValueError):
        pass
    if pa.types.is_temporal(scalar.type) and not pa.types.is_time(scalar.type):
        storage = pa.int32() if pa.types.is_date32(scalar.type) else pa.int64()
        raw = scalar.cast(storage).as_py()
        limit = 2**31 - 1 if storage == pa.int32() else 2**63 - 1
        if abs(raw) >= limit - 1:
            return "infinity" if raw > 0 else "-infinity"
    return str(scalar)


def is_numeric(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)


# --- building the columns shown ----------------------------------------------------------------------


def is_node_table(table: pa.Table) -> bool:
    return set(NODE_COLUMNS) <= set(table.column_names)


def display_columns(table: pa.Table) -> tuple[list[Column], list[str]]:
    """The columns to show, in order, and the names of the columns left out for being all NULL."""
    values = {name: python_values(table.column(name)) for name in table.column_names}
    all_null = [n for n in table.column_names if table.num_rows and all(v is None for v in values[n])]
    if is_node_table(table):
        columns = _node_columns(table, values)
        all_null = [n for n in all_null if n not in FOLDED]
    else:
        columns = [_plain_column(table, n, values[n]) for n in table.column_names]
        for column in columns[:2]:
            column.keep = True
    if table.num_columns > 1:
        columns = [c for c in columns if c.name not in all_null] or columns[:1]
    else:
        all_null = []
    return columns, all_null


def _plain_column(table: pa.Table, name: str, values: list) -> Column:
    typ = table.schema.field(name).type
    render = token_text if name in TOKEN_COLUMNS else format_cell
    return Column(name, [cap(render(v)) for v in values], is_numeric(typ))


def _node_columns(table: pa.Table, values: dict[str, list]) -> list[Column]:
    rows = range(table.num_rows)
    node = Column("node", [_node_id(values, i) for i in rows], False, keep=True)
    columns = [node]
    if "token" in values and any(v is not None for v in values["token"]):
        columns.append(Column("tokens", [cap(_tokens(values, i)) for i in rows], False))
    rest = [n for n in table.column_names if n not in FOLDED]
    value_names = [n for n in rest if n not in KEY_COLUMNS and is_numeric(table.schema.field(n).type)]
    value_names.sort(key=lambda n: n not in PRIMARY_VALUES)
    others = [n for n in rest if n not in value_names]
    shown = [_plain_column(table, n, values[n]) for n in value_names + others]
    if value_names:
        shown[0].keep = True
    return columns + shown


def _node_id(values: dict[str, list], i: int) -> str:
    def get(name: str):
        return values[name][i] if name in values else None

    text = str(get("component"))
    layer, unit = get("layer"), get("unit")
    if layer is not None:
        text += f"[{layer}]" if unit is None else f"[{layer},{unit}]"
    if get("position") is not None:
        text += f"@{get('position')}"
    if get("attended") is not None:
        text += f"→{get('attended')}"
    return text


def _tokens(values: dict[str, list], i: int) -> str:
    token = values["token"][i]
    if token is None:
        return ""
    text = repr(token)
    attended = values["attended_token"][i] if "attended_token" in values else None
    return text if attended is None else f"{text}→{attended!r}"


# --- fitting a width ---------------------------------------------------------------------------------


def fit(columns: list[Column], width: int | None) -> tuple[list[Column], list[str]]:
    """Make the row fit `width`: shorten long free text, hide trailing columns (not those marked
    `keep`: a node and its value, a plain table's first two), then shorten text further. Returns the columns kept and the
    names hidden."""
    if width is None or _total(columns) <= width:
        return columns, []
    _shorten_text(columns, width, TEXT_WIDTH)
    kept = list(columns)
    while _total(kept) > width and (droppable := [c for c in kept if not c.keep]):
        kept.remove(droppable[-1])
    _shorten_text(kept, width, MIN_TEXT_WIDTH)
    return kept, [c.name for c in columns if c not in kept]


def _shorten_text(columns: list[Column], width: int, floor: int) -> None:
    """Shorten the widest text columns (not the first) until the row fits or all are at `floor`."""
    for column in sorted((c for c in columns[1:] if not c.numeric), key=lambda c: -c.width):
        excess = _total(columns) - width
        if excess <= 0:
            return
        target = max(floor, len(column.name), column.width - excess)
        column.cells = [_shorten(c, target) for c in column.cells]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _total(columns: Sequence[Column]) -> int:
    return sum(c.width for c in columns) + len(GAP) * max(len(columns) - 1, 0)


# --- rendering ---------------------------------------------------------------------------------------


def grid_lines(columns: Sequence[Column]) -> list[str]:
    """Header, a rule, and the rows; numbers right-aligned, text left-aligned."""
    widths = [c.width for c in columns]

    def line(cells: Sequence[str], numeric: Sequence[bool]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return GAP.join(parts).rstrip()

    numeric = [c.numeric for c in columns]
    out = [line([c.name for c in columns], numeric), "─" * _total(columns)]
    n_rows = len(columns[0].cells) if columns else 0
    out += [line([c.cells[i] for c in columns], numeric) for i in range(n_rows)]
    return out


def footer(total: int, hidden_rows: int, hidden_columns: Sequence[str] = (), all_null: Sequence[str] = (),
           width: int | None = None) -> str:
    if hidden_rows:
        text = f"({total} rows, {total - hidden_rows} shown; use .mode csv or SQL LIMIT/OFFSET to see more)"
    else:
        text = f"({total} row{'s' if total != 1 else ''})"
    notes = []
    if hidden_columns:
        notes.append(f"hidden to fit the width: {', '.join(hidden_columns)}; \\x or .mode line shows every column")
    if all_null:
        notes.append(f"NULL in every row: {', '.join(all_null)}")
    lines = [text, *(f"({note})" for note in notes)]
    return "\n".join(textwrap.fill(line, width) if width else line for line in lines)


def table_text(table: pa.Table, *, max_rows: int | None, width: int | None) -> str:
    shown = _head(table, max_rows)
    columns, all_null = display_columns(shown)
    columns, hidden = fit(columns, width)
    lines = grid_lines(columns) if table.num_columns else []
    return "\n".join([*lines, footer(table.num_rows, table.num_rows - shown.num_rows, hidden, all_null, width)])


def fits(table: pa.Table, *, max_rows: int | None, width: int | None) -> bool:
    """Whether the table mode shows every column within `width`."""
    shown = _head(table, max_rows)
    kept, hidden = fit(display_columns(shown)[0], width)
    return not hidden and (width is None or _total(kept) <= width)


def line_text(table: pa.Table, *, max_rows: int | None) -> str:
    """One `name = value` line per column, a header per row (sqlite's .mode line, psql's \\x)."""
    shown = _head(table, max_rows)
    names = shown.column_names
    values = [python_values(shown.column(n)) for n in names]
    pad = max((len(n) for n in names), default=0)
    out = []
    for i in range(shown.num_rows):
        out.append(f"-[ row {i + 1} ]" + "-" * max(pad - 6, 4))
        out += [f"{n.rjust(pad)} = {cap((token_text if n in TOKEN_COLUMNS else format_cell)(v[i]))}"
                for n, v in zip(names, values)]
    out.append(footer(table.num_rows, table.num_rows - shown.num_rows))
    return "\n".join(out)
