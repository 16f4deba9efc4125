"""Row tensors -> pyarrow tables with the columns of design §5.

Node tables: prompt_id, layer, component, unit, position, attended, token, attended_token, rank,
then one float64 column per scalar. NULLs: `layer` and `unit` for `embed` rows (the embedding
is not in a layer); `unit` for autoencoder error rows; `attended`/`attended_token` for every
kind but `attn`; `prompt_id` (and `token` where prompts disagree) after `over prompts`; `rank`
for `select`; a scalar where it is not defined for the row's component.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from .reduce import NULL, Rows
from .scalars import ALL_KINDS

NODE_ID_FIELDS = [
    pa.field("prompt_id", pa.int64()),
    pa.field("layer", pa.int32()),
    pa.field("component", pa.string()),
    pa.field("unit", pa.int64()),
    pa.field("position", pa.int32()),
    pa.field("attended", pa.int32()),
    pa.field("token", pa.string()),
    pa.field("attended_token", pa.string()),
    pa.field("rank", pa.int32()),
]

# the node key of the per-node tables the executor builds before the node table (contributions,
# upvoted tokens): raw int64 coordinates, no token strings or rank yet
NODE_KEY_FIELDS = [
    pa.field("prompt_id", pa.int64()),
    pa.field("layer", pa.int64()),
    pa.field("component", pa.string()),
    pa.field("unit", pa.int64()),
    pa.field("position", pa.int64()),
    pa.field("attended", pa.int64()),
]

LOGIT_FIELDS = [
    pa.field("prompt_id", pa.int64()),
    pa.field("position", pa.int32()),
    pa.field("layer", pa.int32()),
    pa.field("vocab_id", pa.int64()),
    pa.field("token", pa.string()),
    pa.field("logit", pa.float64()),
    pa.field("prob", pa.float64()),
    pa.field("rank", pa.int32()),
]


def concat_tables(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """One table from per-batch parts (empty parts dropped; an empty table of `schema` if none)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).combine_chunks()


def node_schema(scalars: Sequence[str]) -> pa.Schema:
    return pa.schema(NODE_ID_FIELDS + [pa.field(s, pa.float64()) for s in scalars])


def _ints(x: torch.Tensor, type_: pa.DataType) -> pa.Array:
    values = x.cpu().numpy()
    return pa.array(values, type=type_, mask=values == NULL)


def _floats(x: torch.Tensor) -> pa.Array:
    values = x.detach().cpu().double().numpy()
    return pa.array(values, type=pa.float64(), mask=np.isnan(values))


def _tokens(ids: torch.Tensor, token_str: Callable[[int], str]) -> pa.Array:
    cache: dict[int, str] = {}
    out = []
    for i in ids.cpu().tolist():
        if i == NULL:
            out.append(None)
        else:
            if i not in cache:
                cache[i] = token_str(i)
            out.append(cache[i])
    return pa.array(out, type=pa.string())


def node_table(rows: Rows | None, scalars: Sequence[str], token_str: Callable[[int], str]) -> pa.Table:
    schema = node_schema(scalars)
    if rows is None or rows["ordinal"].numel() == 0:
        return schema.empty_table()
    n = rows["ordinal"].numel()
    rank = rows.get("rank", torch.full((n,), NULL, dtype=torch.long))
    columns = [
        _ints(rows["prompt_id"], pa.int64()),
        _ints(rows["layer"], pa.int32()),
        pa.array([ALL_KINDS[k] for k in rows["kind"].cpu().tolist()], type=pa.string()),
        _ints(rows["unit"], pa.int64()),
        _ints(rows["position"], pa.int32()),
        _ints(rows["attended"], pa.int32()),
        _tokens(rows["token_id"], token_str),
        _tokens(rows["attended_token_id"], token_str),
        _ints(rank, pa.int32()),
    ] + [_floats(rows[s]) for s in scalars]
    return pa.Table.from_arrays(columns, schema=schema)


def logit_table(rows: Rows | None, token_str: Callable[[int], str]) -> pa.Table:
    schema = pa.schema(LOGIT_FIELDS)
    if rows is None or rows["prompt_id"].numel() == 0:
        return schema.empty_table()
    n = rows["prompt_id"].numel()
    columns = [
        _ints(rows["prompt_id"], pa.int64()),
        _ints(rows["position"], pa.int32()),
        pa.nulls(n, pa.int32()),
        _ints(rows["vocab_id"], pa.int64()),
        _tokens(rows["vocab_id"], token_str),
        _floats(rows["logit"]),
        _floats(rows["prob"]),
        _ints(rows["rank"], pa.int32()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)
