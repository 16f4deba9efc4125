"""`.html`: a result table as one self-contained HTML page, chosen from the table's columns as
`.plot` chooses a picture:

- `graph`: a routes table (`route_edges` or `route_nodes`): LLM-TT's route graph (graph.py);
- `attention`: a table of attention heads with key positions (`attended`): a query x key heatmap
  per head (attention.py);
- `ranked`: every other result: a sortable table with a bar in each value cell (ranked.py).

The route graph and the heatmaps draw with plotly's offline bundle, inlined (page.py). Nothing
here prints or opens a browser: the meta-command does (commands.py).
"""

from __future__ import annotations

import html
from pathlib import Path

import pyarrow as pa

from ...query.errors import TdbqlError
from ..display import rows_of
from . import attention, graph, ranked
from .page import html_page, write_page
from .sources import attention_rows, input_tokens, lens_tops, read_table, routes_threshold, sibling

PAGE_KINDS = ("graph", "attention", "ranked")


def choose_page(table: pa.Table) -> str:
    names = set(table.column_names)
    if graph.EDGE_COLUMNS <= names or graph.NODE_COLUMNS == names:
        return "graph"
    if attention.is_attention(table):
        return "attention"
    return "ranked"


def write_html(session, name: str, path: Path) -> str:
    """Write table `name`'s page to `path`; returns what was drawn, for the confirmation line."""
    if name not in session.table_names():
        raise TdbqlError(f"no table '{name}' to draw")
    table = read_table(session, name)
    if table.num_rows == 0:
        raise TdbqlError(f"nothing to draw: table '{name}' is empty")
    kind = choose_page(table)
    text, note = BUILD[kind](session, name, table)
    write_page(path, text)
    return f"{kind}: {note}"


def heading(title: str, note: str) -> str:
    return f"<h1>{html.escape(title)}</h1>\n<p class=\"note\" id=\"note\">{html.escape(note)}</p>"


MAX_PROMPTS = 16  # prompts a route graph page carries (each with its own attention rows)


def routes_rows(session, name: str, table: pa.Table) -> tuple[list[dict], list[dict] | None]:
    """The edge and node rows of a routes table and its sibling."""
    if graph.EDGE_COLUMNS <= set(table.column_names):
        edges, nodes = table, sibling(session, name, "nodes")
    else:
        edges, nodes = sibling(session, name, "edges"), table
    return (rows_of(edges) if edges is not None else []), (rows_of(nodes) if nodes is not None else None)


def route_graphs_of(session, name: str, table: pa.Table) -> tuple[list[graph.RouteGraph], int]:
    """The graphs of a routes table's first MAX_PROMPTS prompts, with its sibling's rows, tokens,
    threshold, lens tops and head rows (fetched for every prompt at once); and the prompt count."""
    edge_rows, node_rows = routes_rows(session, name, table)
    prompt_ids = sorted({r["prompt_id"] for r in edge_rows or node_rows})
    graphs, heads = [], {}
    for prompt_id in prompt_ids[:MAX_PROMPTS]:
        tokens = input_tokens(session, prompt_id)
        drawn = graph.route_graph(edge_rows, node_rows, tokens, lens_tops(session, prompt_id), prompt_id)
        drawn.threshold = routes_threshold(session, name)
        if all(tokens.get(p) == t for p, t in drawn.tokens.items()):
            heads[prompt_id] = {(e.layer, e.head, e.dst) for e in drawn.edges if e.kind == "attn"}
        else:
            drawn.attention_note = "the prompt set changed since the routes ran"
        graphs.append(drawn)
    rows, note = attention_rows(session, heads)
    for drawn in graphs:
        if drawn.prompt_id in heads:
            drawn.attention = rows.get(drawn.prompt_id, {})
            drawn.attention_note = "" if drawn.attention else (note or "no attention edges")
    return graphs, len(prompt_ids)


def route_graph_of(session, name: str, table: pa.Table, prompt_id: int | None = None) -> graph.RouteGraph:
    """Prompt `prompt_id`'s graph of a routes table (default: the first prompt's)."""
    graphs, _ = route_graphs_of(session, name, table)
    return graphs[0] if prompt_id is None else next(g for g in graphs if g.prompt_id == prompt_id)


def graph_page(session, name: str, table: pa.Table) -> tuple[str, str]:
    graphs, n_prompts = route_graphs_of(session, name, table)
    drawn = graphs[0]
    threshold = f"threshold {drawn.threshold:g}" if drawn.threshold is not None else "threshold unknown"
    counts = f"{len(drawn.nodes)} nodes, {len(drawn.edges)} edges"
    if n_prompts == 1:
        note = f"prompt {drawn.prompt_id}; {threshold}; {counts}"
    else:
        held = "pick one" if len(graphs) == n_prompts else f"the first {len(graphs)} to pick from"
        note = f"{n_prompts} prompts ({held}); {threshold}; prompt {drawn.prompt_id} first: {counts}"
    legend = "".join(f"<span><span class=\"swatch\" style=\"background:{graph.COLOURS[k]}\"></span>{text}</span>"
                     for k, text in (("attn", "attention (one line per head)"), ("mlp", "MLP"),
                                     ("attn_resid", "residual")))
    picker = "" if len(graphs) == 1 else "<label>prompt <select id=\"prompt\"></select></label>"
    body = (f"{heading(f'{name}: route graph', note)}\n<div class=\"controls\">{picker}"
            f"<label>hide edges below <input type=\"range\" id=\"threshold\"> <span id=\"threshold-value\"></span>"
            f"</label><span id=\"edge-count\"></span>{legend}</div>\n<div id=\"graph\"></div>\n"
            f"<div id=\"panel\">Click an attention edge to see its head's attention row.</div>")
    data = {"graphs": [graph.page_data(g) for g in graphs]}
    return html_page(f"{name}: route graph", body, data, "graph.js", plotly=True), note


def attention_page(session, name: str, table: pa.Table) -> tuple[str, str]:
    prompt_id = table.column("prompt_id")[0].as_py() if "prompt_id" in table.column_names else None
    data = attention.page_data(table, input_tokens(session, prompt_id))
    note = "; ".join(filter(None, [data["note"], f"{len(data['heads'])} heads", f"colour {data['value']}"]))
    body = (f"{heading(f'{name}: attention', note)}\n<div class=\"controls\"><label>head "
            f"<select id=\"head\"></select></label></div>\n<div id=\"heatmap\"></div>")
    return html_page(f"{name}: attention", body, data, "attention.js", plotly=True), note


def ranked_page(session, name: str, table: pa.Table) -> tuple[str, str]:
    prompts = {}
    if "prompt_id" in table.column_names and "position" in table.column_names:
        for prompt_id in {p for p in table.column("prompt_id").to_pylist() if p is not None}:
            tokens = input_tokens(session, prompt_id)
            prompts[prompt_id] = [tokens[p] for p in sorted(tokens)]
    data = ranked.page_data(table, prompts)
    body = (f"{heading(f'{name}', data['note'])}\n<table class=\"ranked\" id=\"ranked\"></table>\n"
            f"<div id=\"context\"></div>")
    return html_page(name, body, data, "ranked.js", plotly=False), data["note"]


BUILD = {"graph": graph_page, "attention": attention_page, "ranked": ranked_page}
