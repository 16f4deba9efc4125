"""The route graph's layout (LLM-TT's: token columns, layer rows, one node per residual state)
and its plotly figure. The layout is plain data, so `.plot --kind graph` (matplotlib) draws the
same picture as the page.

Rows, bottom to top: `embed` (y 0), then per layer l `resid.mid` (y 2l+1) and `resid.post`
(y 2l+2); the `mlp` node sits between them, right of its token (x t+MLP_SHIFT, y 2l+1.5).
Every table row is one drawn line: an `attn` row (one head) is a curve from resid.pre[l]@u to
resid.mid[l]@t, bent by its head so that heads between the same nodes stay apart; `mlp` runs
through the FFN node; the residual rows are straight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...executor.arrow import ROUTE_EDGE_SCHEMA, ROUTE_NODE_SCHEMA
from ..display import first_prompt

EDGE_COLUMNS = frozenset(ROUTE_EDGE_SCHEMA.names)
NODE_COLUMNS = frozenset(ROUTE_NODE_SCHEMA.names)
MLP_SHIFT = 0.3
CURVE_POINTS = 9
BEND_PER_HEAD = 0.12
COLOURS = {"attn": "#1f77b4", "mlp": "#ff7f0e", "attn_resid": "#9e9e9e", "mlp_resid": "#9e9e9e"}
NODE_COLOURS = {"embed": "#444444", "resid.mid": "#1f77b4", "mlp": "#ff7f0e", "resid.post": "#2ca02c"}


@dataclass(frozen=True)
class Node:
    layer: int
    kind: str
    position: int
    x: float
    y: float
    token: str = ""
    top: tuple[str, ...] = ()  # what the lens says this residual state promotes


@dataclass(frozen=True)
class Edge:
    layer: int
    kind: str
    head: int | None
    src: int
    dst: int
    weight: float
    xs: tuple[float, ...]
    ys: tuple[float, ...]


@dataclass
class RouteGraph:
    prompt_id: int | None
    tokens: dict[int, str]
    nodes: list[Node]
    edges: list[Edge]
    n_layers: int
    note: str = ""
    threshold: float | None = None
    attention: dict[str, list[float]] = field(default_factory=dict)  # "layer,head,query" -> row over keys
    attention_note: str = ""  # why `attention` is empty


def node_xy(layer: int, kind: str, position: int) -> tuple[float, float]:
    if kind == "embed":
        return float(position), 0.0
    if kind == "mlp":
        return position + MLP_SHIFT, 2 * layer + 1.5
    return float(position), 2 * layer + (1 if kind == "resid.mid" else 2)


def pre_node(layer: int, position: int) -> tuple[int, str, int]:
    """resid.pre[l]: the embedding at l = 0, else resid.post[l-1]."""
    return (0, "embed", position) if layer == 0 else (layer - 1, "resid.post", position)


def endpoints(row: dict) -> list[tuple[int, str, int]]:
    """The nodes an edge row passes through, from its source to its target."""
    layer, kind, src, dst = row["layer"], row["kind"], row["src_position"], row["dst_position"]
    if kind in ("attn", "attn_resid"):
        return [pre_node(layer, src), (layer, "resid.mid", dst)]
    if kind == "mlp":
        return [(layer, "resid.mid", src), (layer, "mlp", dst), (layer, "resid.post", dst)]
    return [(layer, "resid.mid", src), (layer, "resid.post", dst)]


def edge_path(row: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    points = [node_xy(*node) for node in endpoints(row)]
    if row["kind"] == "attn":
        points = bent(points[0], points[1], BEND_PER_HEAD * (row["head"] + 1))
    elif len(points) == 2:  # a middle point, so the line can be hovered and clicked half-way
        (x0, y0), (x1, y1) = points
        points = [points[0], ((x0 + x1) / 2, (y0 + y1) / 2), points[1]]
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def bent(start: tuple[float, float], end: tuple[float, float], bend: float) -> list[tuple[float, float]]:
    """A quadratic curve from start to end whose middle is pushed `bend` to the left of the chord."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    length = (dx * dx + dy * dy) ** 0.5 or 1.0
    cx, cy = (x0 + x1) / 2 - bend * dy / length, (y0 + y1) / 2 + bend * dx / length
    steps = [i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)]
    return [((1 - s) ** 2 * x0 + 2 * (1 - s) * s * cx + s * s * x1,
             (1 - s) ** 2 * y0 + 2 * (1 - s) * s * cy + s * s * y1) for s in steps]


def route_graph(edge_rows: list[dict], node_rows: list[dict] | None, tokens: dict[int, str],
                lens: dict[tuple[int, str, int], tuple[str, ...]] | None = None,
                prompt_id: int | None = None) -> RouteGraph:
    """Prompt `prompt_id`'s graph (default: the first prompt's). Nodes come from the nodes table
    when there is one, else from the edges' ends; `tokens` labels the columns (position -> token);
    `lens` gives a node's top tokens."""
    if prompt_id is not None:
        edge_rows = [r for r in edge_rows if r["prompt_id"] == prompt_id]
        node_rows = None if node_rows is None else [r for r in node_rows if r["prompt_id"] == prompt_id]
        note = f"prompt {prompt_id}"
    else:
        edge_rows, note = first_prompt(edge_rows) if edge_rows else ([], "")
        prompt_id = edge_rows[0]["prompt_id"] if edge_rows else None
    if node_rows:
        node_rows = [r for r in node_rows if r["prompt_id"] == prompt_id] if edge_rows else first_prompt(node_rows)[0]
        keys = {(r["layer"], r["kind"], r["position"]) for r in node_rows}
        tokens = {**tokens, **{r["position"]: r["token"] for r in node_rows}}
    else:
        keys = {node for row in edge_rows for node in endpoints(row)}
    lens = lens or {}
    nodes = [Node(layer, kind, position, *node_xy(layer, kind, position), tokens.get(position, ""),
                  lens.get((layer, kind, position), ())) for layer, kind, position in sorted(keys, key=node_order)]
    edges = [Edge(r["layer"], r["kind"], r["head"], r["src_position"], r["dst_position"], r["weight"],
                  *edge_path(r)) for r in sorted(edge_rows, key=lambda r: -r["weight"])]
    n_layers = max((n.layer for n in nodes), default=-1) + 1
    return RouteGraph(prompt_id, tokens, nodes, edges, n_layers, note)


def node_order(key: tuple[int, str, int]) -> tuple:
    layer, kind, position = key
    return node_xy(layer, kind, position)[1], position


# --- text ----------------------------------------------------------------------------------------


def shown_token(token: str) -> str:
    return repr(token) if token != token.strip() or not token else token


def node_name(node: Node) -> str:
    return "embed" if node.kind == "embed" else f"{node.kind}[{node.layer}]"


def node_text(node: Node) -> str:
    lines = [f"{node_name(node)} at position {node.position}", f"token {shown_token(node.token)}",
             f"layer {node.layer}"]
    if node.top:
        lines.append("promotes " + ", ".join(shown_token(t) for t in node.top))
    return "<br>".join(lines)


def edge_text(edge: Edge, tokens: dict[int, str]) -> str:
    head = f" head {edge.head}" if edge.head is not None else ""
    src, dst = shown_token(tokens.get(edge.src, "")), shown_token(tokens.get(edge.dst, ""))
    return f"layer {edge.layer} {edge.kind}{head}: {src}@{edge.src} → {dst}@{edge.dst}, weight {edge.weight:.3f}"


def row_labels(n_layers: int) -> tuple[list[float], list[str]]:
    ys, labels = [0.0], ["embed"]
    for layer in range(n_layers):
        ys += [2 * layer + 1, 2 * layer + 2]
        labels += [f"L{layer} after attn", f"L{layer} out"]
    return ys, labels


def column_labels(graph: RouteGraph) -> tuple[list[int], list[str]]:
    positions = sorted(graph.tokens)
    return positions, [f"{shown_token(graph.tokens[p])}<br>{p}" for p in positions]


# --- the plotly figure ---------------------------------------------------------------------------


def edge_width(weight: float) -> float:
    return 1.0 + 7.0 * weight


def edge_opacity(weight: float) -> float:
    return 0.3 + 0.7 * min(weight, 1.0)


def figure(graph: RouteGraph) -> dict:
    """Plotly traces and layout: the nodes first (drawn on top by `zorder`, and first among equally
    near points on hover), then one trace per edge (so width, opacity and visibility are per edge),
    strongest first. Each edge trace's `meta` is its row, for the page's script."""
    nodes = {
        "type": "scatter", "mode": "markers", "name": "nodes", "hoverinfo": "text", "zorder": 1,
        "x": [n.x for n in graph.nodes], "y": [n.y for n in graph.nodes],
        "hovertext": [node_text(n) for n in graph.nodes],
        "marker": {"size": 11, "color": [NODE_COLOURS[n.kind] for n in graph.nodes],
                   "line": {"width": 1, "color": "white"}},
        "showlegend": False,
    }
    traces = [nodes] + [edge_trace(edge, graph.tokens) for edge in graph.edges]
    ys, y_labels = row_labels(graph.n_layers)
    xs, x_labels = column_labels(graph)
    layout = {
        "hovermode": "closest", "hoverdistance": 12, "dragmode": "pan",
        "margin": {"l": 110, "r": 20, "t": 30, "b": 90},
        "height": max(420, 70 * (2 * graph.n_layers + 1) + 120),
        "xaxis": {"tickvals": xs, "ticktext": x_labels, "zeroline": False, "showgrid": False,
                  "range": [min(xs, default=0) - 0.7, max(xs, default=0) + 0.7]},
        "yaxis": {"tickvals": ys, "ticktext": y_labels, "zeroline": False, "gridcolor": "#eeeeee",
                  "range": [-0.6, 2 * graph.n_layers + 0.6]},
        "plot_bgcolor": "white",
    }
    return {"data": traces, "layout": layout}


def edge_trace(edge: Edge, tokens: dict[int, str]) -> dict:
    return {
        "type": "scatter", "mode": "lines", "x": list(edge.xs), "y": list(edge.ys),
        "line": {"width": edge_width(edge.weight), "color": COLOURS[edge.kind], "shape": "spline"},
        "opacity": edge_opacity(edge.weight), "hoverinfo": "text", "hovertext": edge_text(edge, tokens),
        "showlegend": False,
        "meta": {"layer": edge.layer, "kind": edge.kind, "head": edge.head, "src": edge.src, "dst": edge.dst,
                 "weight": edge.weight},
    }


def page_data(graph: RouteGraph) -> dict:
    """What the page's script reads: the figure, the threshold, the attention rows, the tokens."""
    weights = [e.weight for e in graph.edges]
    return {
        "figure": figure(graph),
        "threshold": graph.threshold if graph.threshold is not None else min(weights, default=0.0),
        "max_weight": max(weights, default=1.0),
        "attention": graph.attention,
        "tokens": {str(p): t for p, t in graph.tokens.items()},
        "prompt_id": graph.prompt_id,
        "attention_note": graph.attention_note,
    }
