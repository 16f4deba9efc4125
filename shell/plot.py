"""`.plot`: draw a result table to a PNG with matplotlib (the optional `plot` extra).

The table's kind picks the picture (`choose_kind`), unless `--kind` names one:
- `lens` (a logit-lens table): layer x position, each cell the top-1 token, coloured by its
  probability; the input tokens on the position axis;
- `heads` (a table of heads: component head, or attn without key positions): layer x head;
- `attention` (a dense pattern, `select act of attn`): one panel per head, query x key position,
  with layer, head and prompt in the titles (one heatmap of heads x keys for a single query);
- `patching` (columns layer, position, recovered): layer x position heatmap of `recovered`;
- `layers` (layer and position without units): layer x position heatmap of the value;
- `graph` (route edges): the route graph the `.html` page draws (token columns, layer rows, line
  width by weight);
- `routes` (only asked for, `--kind routes`): a route edges table's strongest edges as bars of `weight`;
- `bars`: ranked rows as bars labelled with compact node ids (mixed node tables, logits).
Colour maps diverge around 0 (TwoSlopeNorm) only when the values take both signs. A table with
several prompts draws the first and says so in the title.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..query.errors import TdbqlError
from .display import KEY_COLUMNS, python_values

PLOT_KINDS: tuple[str, ...] = ("lens", "heads", "attention", "patching", "layers", "routes", "bars", "graph")
HEAD_COMPONENTS = frozenset({"head", "attn"})
DEFAULT_VALUES = {"lens": "prob", "patching": "recovered", "routes": "weight", "graph": "weight"}
NOT_VALUES = KEY_COLUMNS | {"n_tokens", "corrupt_n_tokens"}


@dataclass
class Picture:
    """A drawn figure, the kind it is, and a note on what it shows (prompt, value, cut-offs)."""

    kind: str
    figure: object
    note: str


def _values(table: pa.Table, name: str) -> list:
    return python_values(table.column(name)) if name in table.column_names else [None] * table.num_rows


def _all(values: list, test) -> bool:
    return bool(values) and all(test(v) for v in values)


def choose_kind(table: pa.Table) -> str:
    """The picture a table's columns call for (see the module docstring)."""
    names = set(table.column_names)
    components = _values(table, "component")
    if {"src_position", "dst_position", "weight"} <= names:
        return "graph"
    if {"layer", "position", "vocab_id", "token"} <= names and "component" not in names \
            and not _all(_values(table, "layer"), lambda v: v is None):
        return "lens"
    attended = _values(table, "attended")
    if "attended" in names and _all(components, lambda c: c == "attn") and _all(attended, lambda v: v is not None) \
            and _all(_values(table, "rank"), lambda v: v is None):
        return "attention"
    if "component" in names and _all(components, lambda c: c in HEAD_COMPONENTS) \
            and _all(_values(table, "unit"), lambda v: v is not None) and _all(attended, lambda v: v is None):
        return "heads"
    if {"layer", "recovered"} <= names:
        return "patching"
    if {"layer", "position"} <= names and "unit" not in names \
            and not _all(_values(table, "layer"), lambda v: v is None):
        return "layers"
    return "bars"


def value_column(table: pa.Table, preferred: str | None = None, kind: str | None = None) -> str:
    """The numeric column to draw: `preferred`, else the kind's own, else `prob`, else the first
    numeric column that is not a key."""
    names = table.column_names
    if preferred:
        if preferred not in names:
            raise TdbqlError(f"no column '{preferred}' in the table (columns: {', '.join(names)})")
        return preferred
    for name in (DEFAULT_VALUES.get(kind or ""), "recovered", "prob"):
        if name in names:
            return name
    for name, typ in zip(names, table.schema.types):
        if name not in NOT_VALUES and (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
            return name
    raise TdbqlError("the table has no numeric value column to plot")


def draw(table: pa.Table, *, kind: str | None = None, value: str | None = None, title: str | None = None,
         input_tokens: dict[tuple[int, int], str] | None = None) -> Picture:
    """Draw `table` as a matplotlib Figure (not saved)."""
    try:
        from . import plot_kinds  # matplotlib loads only when a plot is drawn
    except ImportError as exc:
        raise TdbqlError("plotting needs matplotlib: pip install 'tdbql[plot]'") from exc

    if table.num_rows == 0:
        raise TdbqlError("nothing to plot: the table is empty")
    kind = kind or choose_kind(table)
    if kind not in PLOT_KINDS:
        raise TdbqlError(f"unknown plot kind '{kind}' (kinds: {', '.join(PLOT_KINDS)})")
    column = value_column(table, value, kind)
    context = plot_kinds.Context(title=title or "table", value=column, input_tokens=input_tokens or {})
    figure, note = plot_kinds.DRAW[kind](table, context)
    return Picture(kind, figure, note)


def plot_table(table: pa.Table, path: Path, *, kind: str | None = None, value: str | None = None,
               title: str | None = None, input_tokens: dict[tuple[int, int], str] | None = None) -> str:
    """Draw `table` to `path` (PNG); returns what was drawn, for the confirmation line."""
    picture = draw(table, kind=kind, value=value, title=title, input_tokens=input_tokens)
    try:
        picture.figure.savefig(path, dpi=120)
    except OSError as exc:
        raise TdbqlError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    finally:
        picture.figure.clear()
    return f"{picture.kind}: {picture.note}"
