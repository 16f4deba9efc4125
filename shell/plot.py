"""`.plot`: draw a result table to a PNG with matplotlib (the optional `plot` extra).

Three pictures, chosen from the table's columns unless named:
- `attention`: query position x key position heatmap (rows with `attended`), first prompt, first head;
- `layers`: position x layer heatmap of a value summed per cell (node tables, logit lens), first prompt;
- `bars`: the ranked rows as horizontal bars (top-k tables, logits).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from ..query.errors import TdbqlError

PLOT_KINDS: tuple[str, ...] = ("attention", "layers", "bars")
KEY_COLUMNS = frozenset(
    {"prompt_id", "layer", "component", "unit", "position", "attended", "token", "attended_token", "rank",
     "vocab_id", "query_id"}
)
MAX_BARS = 30


def value_column(table: pa.Table, preferred: str | None = None) -> str:
    """The numeric column to draw: `preferred`, else `prob` for logit tables, else the first scalar."""
    names = table.column_names
    if preferred:
        if preferred not in names:
            raise TdbqlError(f"no column '{preferred}' in the table (columns: {', '.join(names)})")
        return preferred
    if "prob" in names:
        return "prob"
    for name, typ in zip(names, table.schema.types):
        if name not in KEY_COLUMNS and (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
            return name
    raise TdbqlError("the table has no numeric value column to plot")


def choose_kind(table: pa.Table) -> str:
    names = set(table.column_names)
    if "attended" in names and any(v is not None for v in table.column("attended").to_pylist()):
        return "attention"
    if "rank" in names and table.num_rows <= 100:
        return "bars"
    if {"layer", "position"} <= names:
        return "layers"
    return "bars"


def plot_table(table: pa.Table, path: Path, *, kind: str | None = None, value: str | None = None,
               title: str | None = None) -> str:
    """Draw `table` to `path` (PNG); returns the kind drawn."""
    plt = _pyplot()
    if table.num_rows == 0:
        raise TdbqlError("nothing to plot: the table is empty")
    kind = kind or choose_kind(table)
    if kind not in PLOT_KINDS:
        raise TdbqlError(f"unknown plot kind '{kind}' (kinds: {', '.join(PLOT_KINDS)})")
    column = value_column(table, value)
    fig = {"attention": _attention, "layers": _layers, "bars": _bars}[kind](plt, table, column)
    fig.axes[0].set_title(title or f"{column} ({kind})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return kind


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise TdbqlError("plotting needs matplotlib: pip install 'tdbql[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _first_group(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Rows sharing the first row's values of `keys` (present ones): one prompt, one head."""
    present = [k for k in keys if k in rows[0]]
    first = tuple(rows[0][k] for k in present)
    return [r for r in rows if tuple(r[k] for k in present) == first]


def _tick_labels(rows: list[dict], pos_key: str, token_key: str) -> dict[int, str]:
    return {r[pos_key]: f"{r[pos_key]} {r.get(token_key) or ''}".rstrip() for r in rows if r.get(pos_key) is not None}


def _heatmap(plt, grid: dict[tuple[int, int], float], rows_labels: dict[int, str], col_labels: dict[int, str],
             ylabel: str, xlabel: str):
    import numpy as np

    ys, xs = sorted(rows_labels), sorted(col_labels)
    data = np.full((len(ys), len(xs)), np.nan)
    for (y, x), v in grid.items():
        data[ys.index(y), xs.index(x)] = v
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(xs) + 2), max(3, 0.35 * len(ys) + 1.5)))
    image = ax.imshow(data, aspect="auto", cmap="RdBu_r" if np.nanmin(data) < 0 else "viridis")
    ax.set_yticks(range(len(ys)), [rows_labels[y] for y in ys], fontsize=7)
    ax.set_xticks(range(len(xs)), [col_labels[x] for x in xs], fontsize=7, rotation=90)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    fig.colorbar(image, ax=ax)
    return fig


def _attention(plt, table: pa.Table, column: str):
    rows = [r for r in table.to_pylist() if r.get("attended") is not None]
    rows = _first_group(rows, ("prompt_id", "layer", "unit"))
    grid: dict[tuple[int, int], float] = defaultdict(float)
    for r in rows:
        grid[(r["position"], r["attended"])] += r[column] or 0.0
    fig = _heatmap(plt, grid, _tick_labels(rows, "position", "token"), _tick_labels(rows, "attended", "attended_token"),
                   "query position", "key position")
    return fig


def _layers(plt, table: pa.Table, column: str):
    rows = table.to_pylist()
    if "rank" in table.column_names and "vocab_id" in table.column_names:
        best = min(r["rank"] for r in rows)
        rows = [r for r in rows if r["rank"] == best]
    rows = _first_group(rows, ("prompt_id",))
    grid: dict[tuple[int, int], float] = defaultdict(float)
    for r in rows:
        grid[(r["layer"], r["position"])] += r[column] or 0.0
    layers = {r["layer"]: str(r["layer"]) for r in rows}
    return _heatmap(plt, grid, layers, _tick_labels(rows, "position", "token"), "layer", "position")


def _bar_label(row: dict) -> str:
    if row.get("vocab_id") is not None:
        return repr(row.get("token"))
    parts = [str(row.get("component", "")), f"[{row.get('layer')},{row.get('unit')}]"]
    if row.get("position") is not None:
        parts.append(f"@{row['position']}")
    if row.get("attended") is not None:
        parts.append(f":{row['attended']}")
    return "".join(parts)


def _bars(plt, table: pa.Table, column: str):
    rows = table.slice(0, MAX_BARS).to_pylist()
    labels = [_bar_label(r) for r in rows]
    values = [r[column] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(rows) + 1)))
    ax.barh(range(len(rows)), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(column)
    return fig
