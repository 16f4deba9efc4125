"""Cross-shard reductions: pure functions from the shards' partial results to the table one
process would have computed over the whole dataset. The bound plan says what to do (k, the
ranking scalar, `by`, the `over prompts` reduction); nothing here reads query text.

- `merge_topk`: the top k per group of the union of each shard's top k per group is the top k
  of the whole (a row outside a shard's top k has k better rows in its group already). Ties
  break as executor/reduce.py breaks them: by prompt id (= the prompt's place in the dataset),
  component (residual-stream order), layer, position, attended token, unit; NULLs first.
- `merge_over_states`: `over prompts` accumulators (executor/reduce.OverPromptsSink's sums or
  maxima and counts per node, in float64) are added (maxima: the larger), after padding both to
  the longer prompt; `finish_over` then reduces and ranks them with the executor's own sinks.
  The sums are added in another order than one process adds them (shard by shard, not batch
  by batch), so a mean can differ from one process's in the last bit of float64; values are
  reported in float32, where that almost never shows (the tests allow 1e-6 relative).
- `reduce_metric`, `reduce_patching`: `metric` / `patching` `over prompts` from every prompt's
  row, reduced with the executor's own functions over the rows in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ...executor.arrow import METRIC_SCHEMA, floats, ints, node_table
from ...executor.conditions import and_mask, scalar_mask
from ...executor.patching import _over_prompts, _reduce  # the one-process reductions themselves
from ...executor.reduce import KIND_CODE, OverPromptsSink, SelectSink, TopKSink, group_ids, lexsort, take

TOKEN_FILL = {"min": 2**62, "max": -(2**62)}  # OverPromptsSink._minmax's initial values
F32_MAX = float(np.finfo(np.float32).max)  # TopKSink scores ±inf as the largest finite float


# --- global top-k --------------------------------------------------------------------------------------


def _ints_nulls_first(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Two sort keys that order an integer column with NULLs first: (is set, value)."""
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return [valid, values]


def merge_topk(tables: Sequence[pa.Table], *, k: int, rank_by: str, bottom: bool, by: Sequence[str]) -> pa.Table:
    """The top (bottom) k rows by `rank_by` per `by` group of the shards' node tables, ranked
    and ordered as one process orders them (by group, then rank)."""
    table = pa.concat_tables(tables).combine_chunks()
    if table.num_rows == 0:
        return table
    kind = np.array([KIND_CODE[c] for c in table.column("component").to_pylist()], dtype=np.int64)
    column_keys = {
        "prompt": [pc.fill_null(table.column("prompt_id"), -1).to_numpy(zero_copy_only=False)],
        "component": [kind],
        "layer": _ints_nulls_first(table.column("layer")),
        "token": _ints_nulls_first(table.column("position")),
    }
    group: list[np.ndarray] = [key for name in by for key in column_keys[name]]
    value = table.column(rank_by).to_numpy(zero_copy_only=False).astype(np.float64)
    score = np.clip(-value if bottom else value, -F32_MAX, F32_MAX)
    ties = (column_keys["prompt"] + [kind] + _ints_nulls_first(table.column("layer"))
            + _ints_nulls_first(table.column("position")) + _ints_nulls_first(table.column("attended"))
            + _ints_nulls_first(table.column("unit")))
    keys = group + [-score] + ties
    order = np.lexsort(keys[::-1])  # the last key given to lexsort is its primary one
    rank = _rank_in_groups([g[order] for g in group], len(order))
    kept = order[rank < k]
    out = table.take(pa.array(kept))
    index = out.schema.get_field_index("rank")
    return out.set_column(index, out.schema.field(index), pa.array(rank[rank < k] + 1, pa.int64()))


def _rank_in_groups(sorted_groups: list[np.ndarray], n: int) -> np.ndarray:
    """0-based place of each row within its run of equal group keys."""
    starts = np.zeros(n, dtype=bool)
    if n:
        starts[0] = True
    for key in sorted_groups:
        starts[1:] |= key[1:] != key[:-1]
    index = np.arange(n)
    return index - np.maximum.accumulate(np.where(starts, index, 0))


# --- over prompts: accumulators --------------------------------------------------------------------------


def sink_state(sink: OverPromptsSink, scalars: Sequence[str], token_str) -> dict:
    """What a shard keeps of its `over prompts` sink: accumulators, token ids and their strings."""
    ids = {int(i) for tok in sink.tokens.values() for name, t in tok.items() if name.endswith("_min")
           for i in t.tolist() if 0 <= i < TOKEN_FILL["min"]}
    return {"reduction": sink.reduction, "relative": sink.relative, "scalars": list(scalars),
            "acc": sink.acc, "tokens": sink.tokens, "vocab": {i: token_str(i) for i in sorted(ids)}}


def _pad(t: torch.Tensor, shape: tuple[int, ...], fill: float | int) -> torch.Tensor:
    if tuple(t.shape) == shape:
        return t
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _add_acc(a: dict, b: dict, reduction: str) -> dict:
    slots, keys = max(a["n_slots"], b["n_slots"]), max(a["n_keys"], b["n_keys"])
    out = {"n_slots": slots, "n_keys": keys}
    for name, x in a.items():
        if name in ("n_slots", "n_keys"):
            continue
        shape = (slots, keys, x.shape[2])
        if name == "count" or reduction != "max":
            out[name] = _pad(x, shape, 0.0) + _pad(b[name], shape, 0.0)
        else:
            out[name] = torch.maximum(_pad(x, shape, float("-inf")), _pad(b[name], shape, float("-inf")))
    return out


def _merge_tokens(a: dict, b: dict) -> dict:
    out = {}
    for name, x in a.items():
        kind = name.rsplit("_", 1)[1]
        y = b[name]
        size = max(x.numel(), y.numel())
        x, y = _pad(x, (size,), TOKEN_FILL[kind]), _pad(y, (size,), TOKEN_FILL[kind])
        out[name] = torch.minimum(x, y) if kind == "min" else torch.maximum(x, y)
    return out


def merge_over_states(states: Sequence[dict]) -> dict:
    """The accumulators of every shard as one sink over all of them would hold them."""
    first = states[0]
    acc: dict = {}
    tokens: dict = {}
    vocab: dict = {}
    for state in states:
        vocab.update(state["vocab"])
        for key, value in state["acc"].items():
            acc[key] = value if key not in acc else _add_acc(acc[key], value, state["reduction"])
        for key, value in state["tokens"].items():
            tokens[key] = value if key not in tokens else _merge_tokens(tokens[key], value)
    return {**first, "acc": acc, "tokens": tokens, "vocab": vocab}


def finish_over(state: dict, query) -> pa.Table:
    """The node table of a bound `over prompts` node query from its merged accumulators: the
    executor's own reduction, scalar conditions, ranking and Arrow output."""
    over = OverPromptsSink(state["reduction"], state["relative"])
    over.acc, over.tokens = state["acc"], state["tokens"]
    scalars = state["scalars"]
    by = tuple(query.by)
    sink = SelectSink() if query.mode == "select" else TopKSink(query.k, scalars[0], bottom=query.mode == "bottomk",
                                                               by=by)
    for block in over.finish():
        block.mask = and_mask(block.mask, scalar_mask(query.where, block.values, block.mask.device))
        sink.add(block)
    result = sink.result()
    if result is not None and "rank" in result:
        result = take(result, lexsort([group_ids(result, by), result["rank"]]))
    vocab = state["vocab"]
    return node_table(result, scalars, lambda i: vocab[int(i)])


# --- metric and patching over prompts --------------------------------------------------------------------


def _column(table: pa.Table, name: str) -> torch.Tensor:
    return torch.from_numpy(table.column(name).to_numpy(zero_copy_only=False).astype(np.float64))


def reduce_metric(tables: Sequence[pa.Table], how: str) -> pa.Table:
    """`metric ... over prompts HOW` from the per-prompt rows of every shard, in prompt order."""
    table = pa.concat_tables(tables)
    values = {name: _reduce(_column(table, name), how)[None] for name in ("metric", "metric_clean", "metric_corrupt")}
    return pa.table({"prompt_id": ints(None, 1), **{name: floats(v) for name, v in values.items()}},
                    schema=METRIC_SCHEMA)


def reduce_patching(tables: Sequence[pa.Table], query) -> pa.Table:
    """`patching ... over prompts` from every pair's rows, in prompt order."""
    return _over_prompts(pa.concat_tables(tables), query).combine_chunks()


def positions_from_end(table: pa.Table, lengths: dict[int, int]) -> pa.Table:
    """A patching table's positions counted from the end of each row's running prompt
    (`lengths`: its token count per prompt id), as the sweep counts them over prompts."""
    n = pa.array([lengths[p] for p in table.column("prompt_id").to_pylist()], pa.int64())
    index = table.schema.get_field_index("position")
    return table.set_column(index, table.schema.field(index), pc.subtract(table.column("position"), n))
