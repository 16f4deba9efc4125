"""Batching and on-device reductions: batched == one by one; running top-k per group equals a
sort of the dense rows; `over prompts` equals aggregating the dense rows; `where` semantics."""

from __future__ import annotations

from collections import defaultdict

import pytest
from tdbql.executor.engine import Engine
from tdbql.executor.reduce import TopKSink
from tdbql.executor.runtime.batching import batches
from tdbql.query.context import PromptRow
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import Condition, NodeQuery, Range, ScalarSpec

from tests.executor import engine_helpers
from tests.executor.test_scalars import LOSS, prompts

TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The cat sat on the mat",
    "one two three four five six",
    "A B C D A B C D",
    "The Eiffel Tower is in Paris",
]
ID = ("prompt_id", "layer", "component", "unit", "position", "attended")


def run(loaded, query, batch_size, texts=TEXTS):
    return engine_helpers.run(Engine(loaded, batch_size=batch_size), query, prompts(texts), LOSS)["result"]


def q(mode="topk", k=7, scalars=("act_times_grad", "act"), **kw):
    return NodeQuery(mode=mode, k=k if mode != "select" else None,
                     scalars=tuple(ScalarSpec(name=s) for s in scalars), **kw)


def same(a, b, tol=1e-5):
    ra, rb = a.to_pylist(), b.to_pylist()
    assert [tuple(r[c] for c in ID) + (r["rank"],) for r in ra] == [tuple(r[c] for c in ID) + (r["rank"],) for r in rb]
    for x, y in zip(ra, rb):
        for key, value in x.items():
            if isinstance(value, float):
                assert abs(value - y[key]) <= tol, key


@pytest.mark.parametrize("by", [(), ("layer",), ("prompt",), ("token", "component")])
def test_batched_equals_one_by_one(tiny_model, by):
    loaded = tiny_model("gpt2")
    query = q(by=by)
    one = run(loaded, query, 1)
    assert one.num_rows > 0
    for batch_size in (2, 5):
        same(run(loaded, query, batch_size), one)


def test_batched_equals_one_by_one_llama_bottomk(tiny_model):
    loaded = tiny_model("llama")
    query = q(mode="bottomk", k=5, scalars=("direct_effect", "write_norm"), components=("attn", "head", "mlp", "embed"))
    same(run(loaded, query, 3), run(loaded, query, 1))


def _dense(loaded, scalars=("act_times_grad", "act"), **kw):
    return run(loaded, q(mode="select", scalars=scalars, **kw), 2).to_pylist()


def _key(r):
    return tuple(-1 if r[c] is None else r[c] for c in ID)


@pytest.mark.parametrize("prune_at", [None, 1])  # merge at the end / after every block
@pytest.mark.parametrize("by", [(), ("layer", "component"), ("prompt",), ("token",)])
def test_running_topk_equals_sorting_the_dense_rows(tiny_model, by, prune_at, monkeypatch):
    if prune_at is not None:
        monkeypatch.setattr(TopKSink, "PRUNE_AT", prune_at)
    loaded = tiny_model("gpt2")
    dense = _dense(loaded)
    groups = defaultdict(list)
    field = {"layer": "layer", "component": "component", "prompt": "prompt_id", "token": "position"}
    for r in dense:
        groups[tuple(r[field[b]] for b in by)].append(r)
    want = []
    order = ["embed", "attn", "head", "mlp"]  # components group in residual-stream order
    for key in sorted(groups, key=lambda k: tuple(order.index(x) if isinstance(x, str) else -1 if x is None else x
                                                  for x in k)):
        best = sorted(groups[key], key=lambda r: -r["act_times_grad"])[:7]
        want += [(r["prompt_id"], r["component"], r["layer"], r["unit"], r["position"], r["attended"]) for r in best]
    got = run(loaded, q(by=by), 2).to_pylist()
    assert [(r["prompt_id"], r["component"], r["layer"], r["unit"], r["position"], r["attended"]) for r in got] == want
    assert all(1 <= r["rank"] <= 7 for r in got)


@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_over_prompts_equals_aggregating_dense_rows(tiny_model, reduction):
    loaded = tiny_model("gpt2")
    dense = _dense(loaded, components=("mlp", "attn"))
    agg = defaultdict(list)
    for r in dense:
        agg[(r["component"], r["layer"], r["unit"], r["position"], r["attended"])].append(r["act_times_grad"])
    fn = {"mean": lambda v: sum(v) / len(v), "sum": sum, "max": max}[reduction]
    want = {k: fn(v) for k, v in agg.items()}
    got = run(loaded, q(mode="select", scalars=("act_times_grad",), components=("mlp", "attn"),
                        over_prompts=reduction), 2).to_pylist()
    assert len(got) == len(want)
    for r in got:
        assert r["prompt_id"] is None
        assert abs(r["act_times_grad"] - want[(r["component"], r["layer"], r["unit"], r["position"], r["attended"])]) < 1e-5


def test_over_prompts_with_relative_tokens_aligns_prompt_ends(tiny_model):
    loaded = tiny_model("gpt2")
    where = (Condition(field="token", op="=", value=-1), Condition(field="layer", op="=", value=1))
    dense = _dense(loaded, scalars=("act",), components=("mlp",), where=where)
    by_unit = defaultdict(list)
    for r in dense:
        by_unit[r["unit"]].append(r["act"])
    got = run(loaded, q(mode="topk", k=3, scalars=("act",), components=("mlp",), where=where,
                        over_prompts="mean"), 2).to_pylist()
    want = sorted(by_unit, key=lambda n: -sum(by_unit[n]) / len(by_unit[n]))[:3]
    assert [r["unit"] for r in got] == want
    assert all(r["position"] == -1 and r["token"] is None for r in got)  # last tokens differ across prompts


def test_where_conditions(tiny_model):
    loaded = tiny_model("gpt2")
    where = (
        Condition(field="token", op="in", value=Range(lo=-3, hi=-1)),
        Condition(field="head", op="in", value=(1, 3)),
        Condition(field="attended", op="<", value=2),
        Condition(field="prompt", op="!=", value=11),
        Condition(field="act", op=">", value=0.05),
    )
    rows = _dense(loaded, scalars=("act_times_grad", "act"), components=("attn",), where=where)
    lengths = {10 + i: len(loaded.encode(t)) for i, t in enumerate(TEXTS)}
    everything = _dense(loaded, scalars=("act_times_grad", "act"), components=("attn",))
    want = [r for r in everything if lengths[r["prompt_id"]] - 3 <= r["position"] and r["unit"] in (1, 3)
            and r["attended"] < 2 and r["prompt_id"] != 11 and r["act"] > 0.05]
    assert rows and [_key(r) for r in rows] == [_key(r) for r in want]


def test_same_query_twice_gives_identical_tables(tiny_model):
    loaded = tiny_model("gpt2")
    query = q(k=20, by=("layer",), components=("mlp", "attn", "head", "embed"))
    assert run(loaded, query, 2).equals(run(loaded, query, 2))


def test_ties_break_in_canonical_order(tiny_model):
    """Under a trace, every node downstream has act_times_grad 0: ties resolve identically."""
    from tdbql.query.plan import NodeRef, Trace

    loaded = tiny_model("gpt2")
    query = q(mode="bottomk", k=30, scalars=("act_times_grad",),
              trace=Trace(node=NodeRef(component="mlp", layer=0, index=1, token=-1)),
              where=(Condition(field="act_times_grad", op="=", value=0.0),))
    one, many = run(loaded, query, 1), run(loaded, query, 5)
    same(one, many)
    keys = [_key(r) for r in one.to_pylist()]
    assert keys == sorted(keys, key=lambda k: (k[0], ["embed", "attn", "head", "mlp"].index(k[2]), k[1], k[4], k[5], k[3]))


# --- executor/runtime/batching.py: the one way prompts become padded batches ---------------------------------


def _check_padding(loaded, batch, rows) -> None:
    encoded = [loaded.encode(r.text) for r in rows]
    assert batch.rows == rows and batch.token_ids == encoded
    assert batch.prompt_ids.tolist() == [r.prompt_id for r in rows]
    assert batch.lengths.tolist() == [len(ids) for ids in encoded]
    assert batch.input_ids.shape == (len(rows), max(len(ids) for ids in encoded))
    for b, ids in enumerate(encoded):
        assert batch.input_ids[b, : len(ids)].tolist() == ids
        assert batch.attention_mask[b].tolist() == [True] * len(ids) + [False] * (batch.input_ids.shape[1] - len(ids))
        assert batch.input_ids[b, len(ids):].eq(0).all()


@pytest.mark.parametrize("max_prompts", [1, 2, 5, 9])
def test_batches_by_prompt_count(tiny_model, max_prompts):
    loaded = tiny_model("gpt2")
    rows = prompts(TEXTS)
    got = list(batches(loaded, rows, max_prompts=max_prompts))
    assert [len(b) for b in got] == [min(max_prompts, len(rows) - i) for i in range(0, len(rows), max_prompts)]
    assert [o for b in got for o in b.ordinals.tolist()] == list(range(len(rows)))
    for i, batch in enumerate(got):
        _check_padding(loaded, batch, rows[i * max_prompts: (i + 1) * max_prompts])


@pytest.mark.parametrize("budget", [1, 20, 30, 60, 10_000])
def test_batches_by_padded_token_budget_are_greedy(tiny_model, budget):
    loaded = tiny_model("gpt2")
    rows = prompts(TEXTS)
    lengths = [len(loaded.encode(r.text)) for r in rows]
    got = list(batches(loaded, rows, token_budget=budget))
    start = 0
    for batch in got:
        stop = start + len(batch)
        _check_padding(loaded, batch, rows[start:stop])
        assert len(batch) == 1 or batch.input_ids.numel() <= budget
        if stop < len(rows):  # one more prompt would break the budget
            assert max(lengths[start: stop + 1]) * (stop + 1 - start) > budget
        start = stop
    assert start == len(rows)


def test_batches_keep_attrib_patch_pairs_whole(tiny_model):
    loaded = tiny_model("gpt2")
    rows = prompts(["one two three", "one two three", "The cat sat on the mat", "The cat sat on the mat"])
    width = max(len(loaded.encode(r.text)) for r in rows)
    assert [len(b) for b in batches(loaded, rows, max_prompts=3, pairs=True)] == [4]
    assert [len(b) for b in batches(loaded, rows, max_prompts=3)] == [3, 1]
    assert [len(b) for b in batches(loaded, rows, token_budget=3 * width, pairs=True)] == [2, 2]
    assert [len(b) for b in batches(loaded, rows, token_budget=1, pairs=True)] == [2, 2]
    with pytest.raises(TdbqlError, match="even number"):
        list(batches(loaded, rows[:3], max_prompts=2, pairs=True))
    with pytest.raises(TdbqlError, match="must match"):
        list(batches(loaded, prompts(["one two three", "one"]), max_prompts=2, pairs=True))


def test_batches_reject_empty_and_too_long_prompts_before_any_batch(tiny_model):
    loaded = tiny_model("gpt2")
    n_ctx = loaded.info().n_ctx
    too_long = [PromptRow(prompt_id=0, text="ok"), PromptRow(prompt_id=7, text=" a" * (n_ctx + 1))]
    with pytest.raises(TdbqlError, match=f"prompt 7 has {n_ctx + 1} tokens; the model reads at most {n_ctx}"):
        next(batches(loaded, too_long, max_prompts=1))
    with pytest.raises(TdbqlError, match="prompt 3 has no tokens"):
        next(batches(loaded, [PromptRow(prompt_id=3, text="")], token_budget=100))
    with pytest.raises(ValueError, match="exactly one"):
        next(batches(loaded, too_long[:1]))
