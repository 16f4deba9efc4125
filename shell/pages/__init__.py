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


def route_prompts(session, name: str, table: pa.Table) -> list[int]:
    edge_rows, node_rows = routes_rows(session, name, table)
    return sorted({r["prompt_id"] for r in edge_rows or node_rows})


def route_graph_of(session, name: str, table: pa.Table, prompt_id: int | None = None) -> graph.RouteGraph:
    """Prompt `prompt_id`'s graph of a routes table (default: the first prompt's) with its sibling,
    tokens, threshold, lens tops and head rows."""
    edge_rows, node_rows = routes_rows(session, name, table)
    prompt_id = min(r["prompt_id"] for r in edge_rows or node_rows) if prompt_id is None else prompt_id
    tokens = input_tokens(session, prompt_id)
    drawn = graph.route_graph(edge_rows, node_rows, tokens, lens_tops(session, prompt_id), prompt_id)
    drawn.threshold = routes_threshold(session, name)
    same_prompt = all(tokens.get(p) == t for p, t in drawn.tokens.items())
    heads = {(e.layer, e.head, e.dst) for e in drawn.edges if e.kind == "attn"}
    drawn.attention, drawn.attention_note = attention_rows(session, drawn.prompt_id, heads) if same_prompt else \
        ({}, "the prompt set changed since the routes ran")
    return drawn


def graph_page(session, name: str, table: pa.Table) -> tuple[str, str]:
    prompts = route_prompts(session, name, table)
    graphs = [route_graph_of(session, name, table, p) for p in prompts[:MAX_PROMPTS]]
    drawn = graphs[0]
    threshold = f"threshold {drawn.threshold:g}" if drawn.threshold is not None else "threshold unknown"
    counts = f"{len(drawn.nodes)} nodes, {len(drawn.edges)} edges"
    if len(prompts) == 1:
        note = f"prompt {drawn.prompt_id}; {threshold}; {counts}"
    else:
        held = "pick one" if len(graphs) == len(prompts) else f"the first {len(graphs)} to pick from"
        note = f"{len(prompts)} prompts ({held}); {threshold}; prompt {drawn.prompt_id} first: {counts}"
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
