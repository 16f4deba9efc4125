"""Cross-shard reductions against one sink over everything: the executor's own TopKSink and
OverPromptsSink see all prompts at once; the shards' sinks see a part each, and merge.py combines
what they keep. Values are multiples of 1/2 (many ties, sums exact in any order), with NaNs,
masked nodes, embed rows (layer NULL) and attention rows (per key), over prompts of several
lengths so the shards pad to different widths."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from tdbql.executor.arrow import METRIC_SCHEMA, node_table
from tdbql.executor.reduce import BatchMeta, Block, OverPromptsSink, TopKSink, group_ids, lexsort, take
from tdbql.query.plan import Condition, NodeQuery, ScalarSpec
from tdbql.shell.run.merge import (
    finish_over,
    merge_over_states,
    merge_topk,
    positions_from_end,
    reduce_metric,
    sink_state,
)

LENGTHS = [5, 3, 7, 2, 6, 4, 7, 1, 3, 5]
SHARDS = [range(0, 4), range(4, 7), range(7, 10)]
KINDS = [("embed", None, 1, False), ("attn", 0, 2, True), ("mlp", 0, 3, False), ("attn", 1, 2, True),
         ("mlp", 1, 3, False)]


def token_str(i: int) -> str:
    return f"t{int(i)}"


def make_values(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    T = max(LENGTHS)
    tokens = torch.randint(0, 6, (len(LENGTHS), T), generator=g)
    out = []
    for kind, layer, units, keys in KINDS:
        K = T if keys else 1
        act = torch.randint(-4, 5, (len(LENGTHS), T, K, units), generator=g).float() / 2
        act[torch.rand(act.shape, generator=g) < 0.05] = float("nan")
        out.append({"kind": kind, "layer": layer, "act": act, "grad": act * 3 - 1, "tokens": tokens, "keys": keys})
    return out


def blocks(values: list[dict], prompts: range) -> list[Block]:
    """The blocks one batch of `prompts` gives (padded to its own longest prompt)."""
    ids = list(prompts)
    lengths = torch.tensor([LENGTHS[i] for i in ids])
    T = int(lengths.max())
    t = torch.arange(T)
    valid = t[None, :] < lengths[:, None]
    out = []
    for v in values:
        act, grad = v["act"][ids, :T], v["grad"][ids, :T]
        if v["keys"]:
            act, grad = act[:, :, :T], grad[:, :, :T]
            mask = valid[:, :, None, None] & (t[None, None, :, None] <= t[None, :, None, None]) \
                & valid[:, None, :, None]
        else:
            mask = valid[:, :, None, None]
        mask = mask.expand(act.shape)
        meta = BatchMeta(ordinal=torch.arange(len(ids)), prompt_id=torch.tensor(ids), position=t.expand(len(ids), T),
                         token_id=v["tokens"][ids, :T])
        block = Block(v["kind"], v["layer"], {"act": act, "grad": grad}, mask, meta)
        if v["keys"]:
            block.key_position, block.key_token_id = meta.position, meta.token_id
        out.append(block)
    return out


def ranked_table(sink: TopKSink, by) -> pa.Table:
    result = sink.result()
    result = take(result, lexsort([group_ids(result, tuple(by)), result["rank"]]))
    return node_table(result, ["act", "grad"], token_str)


@pytest.mark.parametrize("by", [(), ("layer",), ("component", "token"), ("token",), ("layer", "component")])
@pytest.mark.parametrize("bottom", [False, True])
@pytest.mark.parametrize("k", [1, 4, 30])
def test_merged_topk_equals_one_sink_over_all_prompts(by, bottom, k):
    values = make_values(seed=len(by) * 7 + k + bottom)
    whole = TopKSink(k, "act", bottom=bottom, by=by)
    for block in blocks(values, range(len(LENGTHS))):
        whole.add(block)
    parts = []
    for shard in SHARDS:
        sink = TopKSink(k, "act", bottom=bottom, by=by)
        for block in blocks(values, shard):
            sink.add(block)
        parts.append(ranked_table(sink, by))
    merged = merge_topk(parts, k=k, rank_by="act", bottom=bottom, by=by)
    assert merged.equals(ranked_table(whole, by))


def test_merge_topk_fixture_pair():
    """Hand-checked: k=2 by layer; a tie on the value goes to the lower prompt id, then the
    earlier component; NULL layers (embed) are their own group, first."""
    def table(rows):
        cols = ["prompt_id", "layer", "component", "unit", "position", "attended", "token", "attended_token", "rank",
                "act"]
        return node_table(None, ["act"], token_str).from_pylist([dict(zip(cols, r)) for r in rows],
                                                                 schema=node_table(None, ["act"], token_str).schema)
    a = table([(0, 1, "mlp", 5, 2, None, "x", None, 1, 3.0), (1, 1, "mlp", 2, 0, None, "y", None, 2, 1.0),
               (0, None, "embed", None, 1, None, "z", None, 1, 0.5)])
    b = table([(7, 1, "attn", 0, 3, 1, "x", "w", 1, 3.0), (6, 1, "mlp", 9, 1, None, "v", None, 2, 2.0),
               (7, None, "embed", None, 0, None, "u", None, 1, 0.75)])
    merged = merge_topk([a, b], k=2, rank_by="act", bottom=False, by=("layer",))
    got = [(r["prompt_id"], r["layer"], r["component"], r["rank"], r["act"]) for r in merged.to_pylist()]
    assert got == [(7, None, "embed", 1, 0.75), (0, None, "embed", 2, 0.5),
                   (0, 1, "mlp", 1, 3.0), (7, 1, "attn", 2, 3.0)]


def over_table(sink_or_state, query) -> pa.Table:
    state = sink_or_state if isinstance(sink_or_state, dict) else sink_state(sink_or_state, ["act", "grad"], token_str)
    return finish_over(state, query)


@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("mode", ["topk", "select"])
def test_merged_over_prompts_equals_one_sink_over_all_prompts(reduction, relative, mode):
    values = make_values(seed=3)
    query = NodeQuery(mode=mode, k=6 if mode == "topk" else None, scalars=(ScalarSpec(name="act"),),
                      by=("layer",) if mode == "topk" else (), over_prompts=reduction,
                      where=(Condition(field="act", op=">", value=-1.0),))
    whole = OverPromptsSink(reduction, relative)
    for block in blocks(values, range(len(LENGTHS))):
        whole.add(block, torch.tensor(LENGTHS)[block.meta.prompt_id])
    states = []
    for shard in SHARDS:
        sink = OverPromptsSink(reduction, relative)
        for block in blocks(values, shard):
            sink.add(block, torch.tensor(LENGTHS)[block.meta.prompt_id])
        states.append(sink_state(sink, ["act", "grad"], token_str))
    expected = over_table(whole, query)
    assert expected.num_rows > 0
    assert over_table(merge_over_states(states), query).equals(expected)


def test_reduce_metric_fixture_pair():
    a = pa.table({"prompt_id": [0, 1], "metric": [1.0, None], "metric_clean": [2.0, 4.0],
                  "metric_corrupt": [None, None]}, schema=METRIC_SCHEMA)
    b = pa.table({"prompt_id": [2], "metric": [4.0], "metric_clean": [3.0], "metric_corrupt": [None]},
                 schema=METRIC_SCHEMA)
    mean = reduce_metric([a, b], "mean").to_pylist()
    assert mean == [{"prompt_id": None, "metric": 2.5, "metric_clean": 3.0, "metric_corrupt": None}]
    assert reduce_metric([a, b], "max").to_pylist()[0]["metric"] == 4.0
    assert math.isclose(reduce_metric([a, b], "sum").to_pylist()[0]["metric_clean"], 9.0)


def test_positions_from_end():
    table = pa.table({"prompt_id": [3, 3, 8], "position": [0, None, 4]})
    assert positions_from_end(table, {3: 5, 8: 6}).column("position").to_pylist() == [-5, None, -2]
