"""Every output schema, and row tensors -> pyarrow tables.

One type per column name, whatever table it is in (`COLUMN_TYPES`): every integer is int64
(DuckDB BIGINT), every value float64, every name a string, so tables join without casts.

Node tables (topk / bottomk / select): prompt_id, layer, component, unit, position, attended,
token, attended_token, rank, then one column per scalar. NULLs: `layer` and `unit` for `embed`
rows (the embedding is not in a layer); `unit` for autoencoder error rows; `attended` /
`attended_token` for every component but `attn`; `prompt_id` (and `token` where prompts
disagree) after `over prompts`; `rank` for `select`; a scalar where the catalog does not define
it for the row's component.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..query.catalog import COMPONENT_NAMES
from .reduce import NULL, Rows

COLUMN_TYPES: dict[str, pa.DataType] = {
    "prompt_id": pa.int64(),
    "layer": pa.int64(),
    "component": pa.string(),
    "unit": pa.int64(),
    "position": pa.int64(),
    "attended": pa.int64(),
    "token": pa.string(),
    "attended_token": pa.string(),
    "rank": pa.int64(),
    "vocab_id": pa.int64(),
    "logit": pa.float64(),
    "logprob": pa.float64(),
    "prob": pa.float64(),
    "rank_change": pa.int64(),
    "score": pa.float64(),
    "contribution": pa.float64(),
    "kind": pa.string(),
    "src_position": pa.int64(),
    "dst_position": pa.int64(),
    "head": pa.int64(),
    "weight": pa.float64(),
    "metric": pa.float64(),
    "metric_clean": pa.float64(),
    "metric_corrupt": pa.float64(),
    "metric_patched": pa.float64(),
    "recovered": pa.float64(),
    "actual_effect": pa.float64(),
    "step": pa.int64(),
    "token_id": pa.int64(),
}


def schema(*names: str) -> pa.Schema:
    """A schema of the named columns, typed by COLUMN_TYPES (scalar columns: float64)."""
    return pa.schema([pa.field(n, COLUMN_TYPES.get(n, pa.float64())) for n in names])


NODE_KEY = ("prompt_id", "layer", "component", "unit", "position", "attended")
NODE_ID = (*NODE_KEY, "token", "attended_token", "rank")
LOGIT_COLUMNS = ("prompt_id", "position", "layer", "vocab_id", "token", "logit", "prob", "rank")

LOGIT_SCHEMA = schema(*LOGIT_COLUMNS)
LOGPROB_SCHEMA = schema(*("logprob" if c == "logit" else c for c in LOGIT_COLUMNS))
LENS_SCHEMA = schema(*LOGIT_COLUMNS, "rank_change")  # the logits table, plus the rank change
UPVOTED_SCHEMA = schema(*NODE_KEY, "vocab_id", "token", "score", "rank")
CONTRIBUTION_SCHEMA = schema(*NODE_KEY, "contribution")
ROUTE_EDGE_SCHEMA = schema("prompt_id", "layer", "kind", "src_position", "dst_position", "head", "weight")
ROUTE_NODE_SCHEMA = schema("prompt_id", "layer", "kind", "position", "token")
GENERATE_SCHEMA = schema("prompt_id", "step", "token_id", "token", "logprob")
METRIC_SCHEMA = schema("prompt_id", "metric", "metric_clean", "metric_corrupt")
PATCHING_SCHEMA = schema("prompt_id", "layer", "component", "unit", "position", "token", "metric_clean",
                         "metric_corrupt", "metric_patched", "recovered")


def node_schema(scalars: Sequence[str]) -> pa.Schema:
    return schema(*NODE_ID, *scalars)


def concat_tables(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """One table from per-batch parts (empty parts dropped; an empty table of `schema` if none)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).combine_chunks()


def ints(values, n: int | None = None) -> pa.Array:
    """int64 column from a tensor / array / list (the NULL sentinel becomes NULL), or n NULLs."""
    if values is None:
        return pa.nulls(n, pa.int64())
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values, dtype=np.int64)
    return pa.array(values, type=pa.int64(), mask=values == NULL)


def floats(values) -> pa.Array:
    """float64 column (NaN becomes NULL)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    values = np.asarray(values, dtype=np.float64)
    return pa.array(values, type=pa.float64(), mask=np.isnan(values))


def repeat(value, n: int, name: str) -> pa.Array:
    """A column of n copies of one value, typed as `name`."""
    return pa.array([value] * n, type=COLUMN_TYPES[name])


def token_strings(ids, token_str: Callable[[int], str]) -> pa.Array:
    """Token strings of ids (NULL for the NULL sentinel), each id decoded once."""
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().tolist()
    cache: dict[int, str] = {}
    out = []
    for i in ids:
        if i == NULL:
            out.append(None)
        else:
            if i not in cache:
                cache[i] = token_str(i)
            out.append(cache[i])
    return pa.array(out, type=pa.string())


def node_table(rows: Rows | None, scalars: Sequence[str], token_str: Callable[[int], str]) -> pa.Table:
    node = node_schema(scalars)
    if rows is None or rows["ordinal"].numel() == 0:
        return node.empty_table()
    n = rows["ordinal"].numel()
    rank = rows.get("rank", torch.full((n,), NULL, dtype=torch.long))
    columns = [
        ints(rows["prompt_id"]),
        ints(rows["layer"]),
        pa.array([COMPONENT_NAMES[k] for k in rows["kind"].cpu().tolist()], type=pa.string()),
        ints(rows["unit"]),
        ints(rows["position"]),
        ints(rows["attended"]),
        token_strings(rows["token_id"], token_str),
        token_strings(rows["attended_token_id"], token_str),
        ints(rank),
    ] + [floats(rows[s]) for s in scalars]
    return pa.Table.from_arrays(columns, schema=node)


def logit_table(rows: Rows | None, token_str: Callable[[int], str], *, logprobs: bool = False) -> pa.Table:
    """Top-k vocabulary rows; `logprobs` names the value column logprob (log-softmax values)."""
    out = LOGPROB_SCHEMA if logprobs else LOGIT_SCHEMA
    if rows is None or rows["prompt_id"].numel() == 0:
        return out.empty_table()
    n = rows["prompt_id"].numel()
    columns = [
        ints(rows["prompt_id"]),
        ints(rows["position"]),
        ints(None, n),
        ints(rows["vocab_id"]),
        token_strings(rows["vocab_id"], token_str),
        floats(rows["logit"]),
        floats(rows["prob"]),
        ints(rows["rank"]),
    ]
    return pa.Table.from_arrays(columns, schema=out)
