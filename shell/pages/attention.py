"""The attention pattern page: a query x key heatmap per head of a table with `attended` (`select
act of attn ...`), a head picker, token labels on both axes, the exact value on hover."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from ..display import first_prompt, rows_of
from ..plot import value_column
from .graph import shown_token

MAX_HEADS = 256


def is_attention(table: pa.Table) -> bool:
    """Rows of attention heads with key positions: `attended` set, and only `attn` components."""
    names = set(table.column_names)
    if "attended" not in names or table.column("attended").null_count == table.num_rows:
        return False
    return "component" not in names or set(table.column("component").to_pylist()) <= {"attn"}


def label(position: int, tokens: dict[int, str]) -> str:
    return f"{shown_token(tokens[position])} {position}" if position in tokens else str(position)


def page_data(table: pa.Table, tokens: dict[int, str]) -> dict:
    """One heatmap per (layer, head) of the first prompt: z[query][key], with labels and hover text.
    `tokens` is the prompt's position -> token (else the table's own tokens are used)."""
    value = value_column(table)
    rows, note = first_prompt(rows_of(table))
    tokens = {**{r["position"]: r["token"] for r in rows if r.get("token") is not None},
              **{r["attended"]: r["attended_token"] for r in rows if r.get("attended_token") is not None},
              **tokens}
    by_head: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in rows:
        by_head[(r["layer"], r["unit"])].append(r)
    heads = sorted(by_head)[:MAX_HEADS]
    if len(by_head) > MAX_HEADS:
        note = "; ".join(filter(None, [note, f"first {MAX_HEADS} of {len(by_head)} heads"]))
    return {"value": value, "note": note, "heads": [head_map(layer, head, by_head[(layer, head)], value, tokens)
                                                      for layer, head in heads]}


def head_map(layer: int, head: int, rows: list[dict], value: str, tokens: dict[int, str]) -> dict:
    queries = sorted({r["position"] for r in rows})
    keys = sorted({r["attended"] for r in rows})
    z: list[list[float | None]] = [[None] * len(keys) for _ in queries]
    text = [[""] * len(keys) for _ in queries]
    for r in rows:
        q, k = queries.index(r["position"]), keys.index(r["attended"])
        z[q][k] = r[value]
        text[q][k] = (f"layer {layer} head {head}<br>query {label(r['position'], tokens)}<br>"
                      f"key {label(r['attended'], tokens)}<br>{value} {r[value]!r}")
    return {"label": f"layer {layer} head {head}", "layer": layer, "head": head, "z": z, "text": text,
            "x": keys, "y": queries, "x_labels": [label(k, tokens) for k in keys],
            "y_labels": [label(q, tokens) for q in queries]}
