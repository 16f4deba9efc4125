"""What a page reads from the session besides its own table: the other half of a route graph,
the prompt's tokens, the threshold a routes query ran with (its `queries` row), a logit-lens
table for the same prompt, and the attention rows of the heads a graph's edges name.
"""

from __future__ import annotations

import json

import pyarrow as pa

from ...executor.arrow import LENS_SCHEMA
from ...query.errors import TdbqlError
from ..display import rows_of
from ..text import quote_ident

LENS_COLUMNS = frozenset(LENS_SCHEMA.names)
LENS_TOP = 3
# a lens site and layer -> the route node holding that residual state
LENS_NODES = {"resid.mid": lambda layer: (layer, "resid.mid"), "resid.post": lambda layer: (layer, "resid.post"),
              "resid.pre": lambda layer: (0, "embed") if layer == 0 else (layer - 1, "resid.post")}


def read_table(session, name: str) -> pa.Table:
    return session.con.sql(f"SELECT * FROM {quote_ident(name)}").to_arrow_table()


def real_name(session, name: str) -> str:
    """The table a name stands for: `_` is a view over the last result."""
    if name != "_":
        return name
    rows = session.con.sql("SELECT sql FROM duckdb_views() WHERE view_name = '_'").fetchall()
    return rows[0][0].rstrip(";").split(" FROM ", 1)[1].strip().strip('"') if rows else name


def sibling(session, name: str, suffix: str) -> pa.Table | None:
    """`route_nodes` for `route_edges` (and back): the other table of a routes query."""
    base = real_name(session, name).rsplit("_", 1)[0]
    other = f"{base}_{suffix}"
    return read_table(session, other) if other in session.table_names() else None


def input_tokens(session, prompt_id: int | None) -> dict[int, str]:
    if prompt_id is None or "tokens" not in session.table_names():
        return {}
    rows = session.con.sql("SELECT position, token FROM tokens WHERE prompt_id = ?", params=[prompt_id]).fetchall()
    return dict(rows)


def query_plan(session, name: str) -> dict | None:
    """The plan (as JSON) of the query whose results include table `name`."""
    name = real_name(session, name)
    for plan, names in session.con.sql("SELECT plan_json, table_name FROM queries ORDER BY query_id DESC").fetchall():
        if name in (names or "").split(","):
            return json.loads(plan)
    return None


def routes_threshold(session, name: str) -> float | None:
    plan = query_plan(session, name)
    return plan.get("threshold") if plan and plan.get("kind") == "routes" else None


def lens_tops(session, prompt_id: int | None) -> dict[tuple[int, str, int], tuple[str, ...]]:
    """(layer, node kind, position) -> the top tokens of the newest logit-lens tables of the prompt."""
    tops: dict[tuple[int, str, int], tuple[str, ...]] = {}
    for name in reversed(session.table_names()):
        plan = query_plan(session, name)
        if plan is None or plan.get("kind") != "logit_lens" or name not in session.table_names():
            continue
        node_of = LENS_NODES[plan.get("at", "resid.post")]
        rows = session.con.sql(
            f"SELECT layer, position, list(token ORDER BY rank) FROM {quote_ident(name)} "
            f"WHERE prompt_id = ? AND rank <= {LENS_TOP} GROUP BY ALL", params=[prompt_id]).fetchall()
        for layer, position, tokens in rows:
            tops.setdefault((*node_of(layer), position), tuple(tokens))
    return tops


def attention_rows(session, heads: dict[int, set[tuple[int, int, int]]]) -> tuple[dict[int, dict], str]:
    """prompt -> "layer,head,query" -> the head's attention probabilities over keys 0..query, for
    the (layer, head, query) each prompt's graph names; one `select act of attn` over every prompt
    on the session's model, keeping no table. Empty, with the reason, when it cannot."""
    heads = {prompt_id: wanted for prompt_id, wanted in heads.items() if wanted}
    if not heads:
        return {}, "no attention edges"
    if not session.is_loaded:
        return {}, "the model is not loaded in this session"
    listed = lambda values: ", ".join(map(str, sorted(values)))  # noqa: E731
    layers = {layer for wanted in heads.values() for layer, _, _ in wanted}
    queries = {query for wanted in heads.values() for _, _, query in wanted}
    text = (f"select act of attn where prompt in ({listed(heads)}) and layer in ({listed(layers)}) "
            f"and token in ({listed(queries)})")
    try:
        table = session.run_unsaved(text)
    except TdbqlError as err:
        return {}, f"the prompt set changed since the routes ran ({err.message})"
    rows: dict[int, dict[str, list[float]]] = {prompt_id: {} for prompt_id in heads}
    for row in rows_of(table):
        if (row["layer"], row["unit"], row["position"]) in heads.get(row["prompt_id"], ()):
            key = f"{row['layer']},{row['unit']},{row['position']}"
            rows[row["prompt_id"]].setdefault(key, [0.0] * (row["position"] + 1))[row["attended"]] = row["act"]
    return rows, ""
