"""The pictures of `.plot` (chosen in plot.py), drawn on matplotlib Figures without pyplot (so no
global figure state and no GUI backend). Imported only when a plot is drawn: matplotlib is the
optional `plot` extra.

Each `draw_<kind>(table, context)` returns the Figure and a note saying what it shows.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from ..query.errors import TdbqlError
from .display import first_prompt, rows_of
from .pages import graph

MAX_BARS = 30
MAX_PANELS = 16
MAX_ANNOTATED_CELLS = 600
LABEL_CHARS = 8
SIGN_FRACTION = 0.02


@dataclass
class Context:
    title: str
    value: str
    input_tokens: dict[tuple[int, int], str] = field(default_factory=dict)


# --- rows, prompts, labels ---------------------------------------------------------------------------


def token_label(token: str | None) -> str:
    if token is None:
        return ""
    shown = token.strip() or repr(token)
    return shown if len(shown) <= LABEL_CHARS else shown[: LABEL_CHARS - 1] + "…"


def position_labels(rows: list[dict], positions: list, context: Context, token_key: str | None) -> list[str]:
    """`position: token` for each position, from the prompt's input tokens (or the table's)."""
    prompt = rows[0].get("prompt_id") if rows else None
    own = {r.get("position"): r.get(token_key) for r in rows} if token_key else {}
    labels = []
    for position in positions:
        if position is None:
            labels.append("all")
            continue
        token = context.input_tokens.get((prompt, position), own.get(position))
        labels.append(f"{position}: {token_label(token)}" if token is not None else str(position))
    return labels


def node_label(row: dict) -> str:
    """attn[1,0]@13→1, mlp[0,404]@3, ' Mary'@13 for logits."""
    if row.get("component") is None:
        at = f"@{row['position']}" if row.get("position") is not None else ""
        return f"{row.get('token')!r}{at}"
    text = str(row["component"])
    if row.get("layer") is not None:
        text += f"[{row['layer']}]" if row.get("unit") is None else f"[{row['layer']},{row['unit']}]"
    if row.get("position") is not None:
        text += f"@{row['position']}"
    if row.get("attended") is not None:
        text += f"→{row['attended']}"
    return text


def join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# --- colour ------------------------------------------------------------------------------------------


def color_scale(data: np.ndarray) -> tuple[str, Normalize]:
    """A diverging map centred on 0, symmetric so that equal sizes get equal strength, when the
    values really take both signs (the smaller side reaches SIGN_FRACTION of the larger: a
    -0.003 beside 1.0 is noise, not a second sign); else a sequential one."""
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if low < 0 < high and min(-low, high) >= SIGN_FRACTION * max(-low, high):
        size = max(-low, high)
        return "RdBu_r", TwoSlopeNorm(vmin=-size, vcenter=0.0, vmax=size)
    if low >= 0:  # one sign: the scale starts at 0, so a colour reads as a size
        low = 0.0
    elif high <= 0:
        high = 0.0
    if low == high:
        low, high = low - 0.5, high + 0.5
    return ("viridis" if high >= -low else "viridis_r"), Normalize(vmin=low, vmax=high)


def heatmap(ax, data: np.ndarray, colorbar_label: str):
    cmap, norm = color_scale(data)
    ax.set_facecolor("#eeeeee")  # cells without a row
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    return image


def annotate(ax, data: np.ndarray, texts: list[list[str]], image) -> None:
    """Write each cell's text, dark on light cells and light on dark ones."""
    if data.size > MAX_ANNOTATED_CELLS:
        return
    size = 7 if data.size <= 150 else 5
    for (y, x), value in np.ndenumerate(data):
        if not texts[y][x]:
            continue
        rgba = image.cmap(image.norm(value)) if np.isfinite(value) else (1, 1, 1, 1)
        dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
        ax.text(x, y, texts[y][x], ha="center", va="center", fontsize=size, color="white" if dark else "black")


def grid(cells: dict[tuple, float], ys: list, xs: list) -> np.ndarray:
    data = np.full((len(ys), len(xs)), np.nan)
    for (y, x), v in cells.items():
        data[ys.index(y), xs.index(x)] = np.nan if v is None else v
    return data


def set_title(ax, title: str, note: str = "") -> None:
    """The title, and the note under it, wrapped to the figure's width."""
    chars = max(30, int(ax.figure.get_figwidth() * 11))
    lines = textwrap.wrap(title, chars) + textwrap.wrap(note, chars)
    ax.set_title("\n".join(lines), fontsize=9)


def layer_range(layers) -> list:
    """Every layer from the first to the last, so that a layer without rows shows as an empty row."""
    known = [layer for layer in layers if layer is not None]
    return list(range(min(known), max(known) + 1)) + ([None] if None in layers else []) if known else [None]


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(min(max(width, 4.5), 24), min(max(height, 3.0), 24)), layout="constrained")


def sort_key(value):
    return (value is None, value if value is not None else 0)


# --- kinds -------------------------------------------------------------------------------------------


def draw_lens(table: pa.Table, context: Context):
    rows, prompt_note = first_prompt(rows_of(table))
    best: dict[tuple, dict] = {}
    for r in rows:  # the top-1 prediction of each (layer, position)
        key = (r["layer"], r["position"])
        if key not in best or (r.get("rank") or math.inf) < (best[key].get("rank") or math.inf):
            best[key] = r
    layers = layer_range({k[0] for k in best})
    positions = sorted({k[1] for k in best}, key=sort_key)
    data = grid({k: r[context.value] for k, r in best.items()}, layers, positions)
    texts = [[token_label(best[(y, x)]["token"]) if (y, x) in best else "" for x in positions] for y in layers]
    figure = new_figure(0.62 * len(positions) + 2.5, 0.42 * len(layers) + 2)
    ax = figure.subplots()
    image = heatmap(ax, data, f"{context.value} of the top-1 token")
    annotate(ax, data, texts, image)
    layer_position_axes(ax, layers, position_labels(rows, positions, context, None))
    set_title(ax, f"{context.title}: top-1 token by layer and position", prompt_note)
    return figure, join_notes(prompt_note, f"top-1 token, colour {context.value}")


def layer_position_axes(ax, layers: list[int], position_labels: list[str]) -> None:
    """A layer x position grid's axes: positions along the bottom, the last layer on top."""
    ax.invert_yaxis()
    ax.set_xticks(range(len(position_labels)), position_labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer")


def draw_heads(table: pa.Table, context: Context):
    rows, prompt_note = first_prompt(rows_of(table))
    cells: dict[tuple, float] = {}
    repeated = False
    for r in rows:
        key, value = (r["layer"], r["unit"]), r[context.value]
        if key in cells:
            repeated = True
            if value is None or (cells[key] is not None and abs(cells[key]) >= abs(value)):
                continue
        cells[key] = value
    layers = layer_range({k[0] for k in cells})
    heads = list(range(max(k[1] for k in cells) + 1))
    data = grid(cells, layers, heads)
    figure = new_figure(0.55 * len(heads) + 2.5, 0.42 * len(layers) + 2)
    ax = figure.subplots()
    image = heatmap(ax, data, context.value)
    texts = [[f"{v:.2g}" if np.isfinite(v) else "" for v in row] for row in data]
    annotate(ax, data, texts, image)
    ax.invert_yaxis()
    ax.set_xticks(range(len(heads)), [str(h) for h in heads], fontsize=7)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    repeat_note = "largest |value| of each head's rows" if repeated else ""
    set_title(ax, f"{context.title}: {context.value} by layer and head", prompt_note)
    return figure, join_notes(prompt_note, f"colour {context.value}", repeat_note)


def draw_attention(table: pa.Table, context: Context):
    rows, prompt_note = first_prompt(rows_of(table))
    by_head: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_head[(r["layer"], r["unit"])].append(r)
    heads = sorted(by_head)
    shown = heads[:MAX_PANELS]
    cut_note = f"first {MAX_PANELS} of {len(heads)} heads" if len(heads) > MAX_PANELS else ""
    queries = sorted({r["position"] for r in rows})
    prompt = rows[0].get("prompt_id")
    which = prompt_note or (f"prompt {prompt}" if prompt is not None else "")
    title = f"{context.title}: attention ({context.value})" + (f", {which}" if which else "") + \
        (f", {cut_note}" if cut_note else "")
    if len(queries) == 1:
        figure = _attention_one_query(by_head, shown, rows, context, title + f", query position {queries[0]}")
    else:
        figure = _attention_panels(by_head, shown, context, title)
    return figure, join_notes(prompt_note, f"{len(shown)} heads", cut_note)


def _attention_one_query(by_head, heads, rows, context: Context, title: str) -> Figure:
    keys = sorted({r["attended"] for r in rows})
    cells = {(h, r["attended"]): r[context.value] for h in heads for r in by_head[h]}
    data = grid(cells, heads, keys)
    figure = new_figure(0.5 * len(keys) + 3, 0.3 * len(heads) + 2)
    ax = figure.subplots()
    heatmap(ax, data, context.value)
    ax.set_xticks(range(len(keys)), position_labels(rows, keys, context, "attended_token"), rotation=60,
                  ha="right", fontsize=7)
    ax.set_yticks(range(len(heads)), [f"L{layer}H{head}" for layer, head in heads], fontsize=7)
    ax.set_xlabel("key position")
    ax.set_ylabel("head")
    set_title(ax, title)
    return figure


def _attention_panels(by_head, heads, context: Context, title: str) -> Figure:
    columns = min(4, len(heads))
    rows_n = math.ceil(len(heads) / columns)
    figure = new_figure(3.6 * columns + 1, 3.4 * rows_n + 0.6)
    axes = np.atleast_1d(figure.subplots(rows_n, columns, squeeze=False)).ravel()
    every = np.array([r[context.value] for h in heads for r in by_head[h] if r[context.value] is not None], float)
    cmap, norm = color_scale(every)  # one scale for every panel, so heads compare
    image = None
    for ax, head in zip(axes, heads):
        rows = by_head[head]
        queries, keys = sorted({r["position"] for r in rows}), sorted({r["attended"] for r in rows})
        data = grid({(r["position"], r["attended"]): r[context.value] for r in rows}, queries, keys)
        ax.set_facecolor("#eeeeee")
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_xticks(range(len(keys)), position_labels(rows, keys, context, "attended_token"), rotation=90,
                      fontsize=5)
        ax.set_yticks(range(len(queries)), position_labels(rows, queries, context, "token"), fontsize=5)
        ax.set_xlabel("key position", fontsize=7)
        ax.set_ylabel("query position", fontsize=7)
        ax.set_title(f"layer {head[0]} head {head[1]}, prompt {rows[0].get('prompt_id')}", fontsize=8)
    for ax in axes[len(heads):]:
        ax.set_visible(False)
    figure.colorbar(image, ax=list(axes[:len(heads)]), label=context.value, shrink=0.8)
    figure.suptitle(title, fontsize=10)
    return figure


def draw_position_grid(table: pa.Table, context: Context, *, token_key: str | None, how: str):
    """layer x position of the value (`patching`, `layers`); repeated cells are summed or averaged."""
    rows, prompt_note = first_prompt(rows_of(table))
    if "position" not in table.column_names:
        rows = [{**r, "position": None} for r in rows]
    sums: dict[tuple, float] = defaultdict(float)
    counts: dict[tuple, int] = defaultdict(int)
    for r in rows:
        if r.get(context.value) is not None:
            sums[(r["layer"], r["position"])] += r[context.value]
            counts[(r["layer"], r["position"])] += 1
    if not sums:
        raise TdbqlError(f"nothing to plot: {context.value} is NULL in every row")
    repeated = max(counts.values()) > 1
    cells = {k: (s / counts[k] if how == "mean" else s) for k, s in sums.items()}
    layers = layer_range({k[0] for k in cells})
    positions = sorted({k[1] for k in cells}, key=sort_key)
    data = grid(cells, layers, positions)
    figure = new_figure(0.5 * len(positions) + 3, 0.42 * len(layers) + 2)
    ax = figure.subplots()
    image = heatmap(ax, data, context.value)
    annotate(ax, data, [[f"{v:.2f}" if np.isfinite(v) else "" for v in row] for row in data], image)
    layer_position_axes(ax, layers, position_labels(rows, positions, context, token_key))
    set_title(ax, f"{context.title}: {context.value} by layer and position", prompt_note)
    repeat_note = f"{how} of the rows in each cell" if repeated else ""
    return figure, join_notes(prompt_note, f"colour {context.value}", repeat_note)


def draw_bars(table: pa.Table, context: Context):
    return bars(rows_of(table), context, node_label, "")


def bars(rows: list[dict], context: Context, label: Callable[[dict], str], note: str):
    shown = rows[:MAX_BARS]
    values = [r[context.value] if r[context.value] is not None else 0.0 for r in shown]
    figure = new_figure(7, 0.28 * len(shown) + 1.6)
    ax = figure.subplots()
    ax.barh(range(len(shown)), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.set_yticks(range(len(shown)), [label(r) for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(context.value)
    set_title(ax, f"{context.title}: {context.value}")
    cut = f"first {MAX_BARS} of {len(rows)} rows" if len(rows) > MAX_BARS else f"{len(rows)} rows"
    return figure, join_notes(note, cut)


def draw_routes(table: pa.Table, context: Context):
    """The strongest edges of the first prompt's route graph, as bars of their weight."""
    rows, prompt_note = first_prompt(rows_of(table))
    rows.sort(key=lambda r: -(r.get(context.value) or 0.0))

    def label(r: dict) -> str:
        head = f" h{r['head']}" if r.get("head") is not None else ""
        src = position_labels(rows, [r["src_position"]], context, None)[0]
        dst = position_labels(rows, [r["dst_position"]], context, None)[0]
        return f"L{r['layer']} {r.get('kind', '')}{head}  {src} → {dst}"

    return bars(rows, context, label, prompt_note)


def draw_graph(table: pa.Table, context: Context):
    """The route graph as the `.html` page lays it out (pages/graph.py), line width by weight."""
    if not graph.EDGE_COLUMNS <= set(table.column_names):
        raise TdbqlError("the graph kind draws a routes edges table (route_edges)")
    rows = rows_of(table)
    prompt = min(r["prompt_id"] for r in rows)
    tokens = {position: token for (p, position), token in context.input_tokens.items() if p == prompt}
    drawn = graph.route_graph(rows, None, tokens)
    figure = new_figure(0.7 * max(len(drawn.tokens), 4) + 2, 0.55 * (2 * drawn.n_layers + 1) + 1.5)
    ax = figure.subplots()
    for edge in reversed(drawn.edges):  # the strongest on top
        ax.plot(edge.xs, edge.ys, color=graph.COLOURS[edge.kind], linewidth=0.6 * graph.edge_width(edge.weight),
                alpha=graph.edge_opacity(edge.weight), solid_capstyle="round", zorder=1)
    ax.scatter([n.x for n in drawn.nodes], [n.y for n in drawn.nodes], s=30, zorder=2, edgecolors="white",
               c=[graph.NODE_COLOURS[n.kind] for n in drawn.nodes])
    xs, _ = graph.column_labels(drawn)
    ax.set_xticks(xs, [token_label(drawn.tokens[x]) for x in xs], rotation=60, ha="right", fontsize=7)
    ys, y_labels = graph.row_labels(drawn.n_layers)
    ax.set_yticks(ys, y_labels, fontsize=7)
    ax.set_xlabel("position (input token)")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    note = join_notes(drawn.note, f"{len(drawn.nodes)} nodes, {len(drawn.edges)} edges")
    set_title(ax, f"{context.title}: route graph (attention blue, MLP orange, residual grey)", note)
    return figure, note


DRAW = {
    "lens": draw_lens,
    "heads": draw_heads,
    "attention": draw_attention,
    "patching": lambda table, context: draw_position_grid(table, context, token_key="token", how="mean"),
    "layers": lambda table, context: draw_position_grid(table, context, token_key="token", how="sum"),
    "routes": draw_routes,
    "bars": draw_bars,
    "graph": draw_graph,
}
