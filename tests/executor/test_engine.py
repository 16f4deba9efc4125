"""Pass planning, explain, errors, output schema and dispatch."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from tdbql.executor import blocks
from tdbql.executor.engine import Engine
from tdbql.executor.interventions import Interventions
from tdbql.executor.passes import run_passes
from tdbql.executor.scalars import Raw
from tdbql.query.context import PromptRow
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import Condition, LogitLensQuery, NodeQuery, NodeRef, RoutesQuery, ScalarSpec, Trace

from tests.executor.engine_helpers import explain, plan, run
from tests.executor.test_scalars import LOSS, prompts

TEXTS = ["When Mary and John went to the store", "The cat sat on the mat"]


def q(*scalars, **kw):
    kw.setdefault("mode", "topk")
    kw.setdefault("k", 5)
    return NodeQuery(scalars=tuple(ScalarSpec(name=s) for s in scalars), **kw)


def test_forward_only_plan_uses_no_grad_and_fused_attention(tiny_model):
    engine = Engine(tiny_model("gpt2"))
    node_plan = plan(engine, q("act", components=("mlp",)), prompts(TEXTS), None)
    assert node_plan.raws == {Raw("mlp.post", 0), Raw("mlp.post", 1)}
    assert not node_plan.needs_backward and node_plan.grad_entry is None
    text = explain(engine, q("act", components=("mlp",)), prompts(TEXTS), None)
    assert "no_grad" in text and "fused SDPA at every layer" in text and "backward" not in text


def test_head_write_scalars_need_no_probabilities(tiny_model):
    engine = Engine(tiny_model("gpt2"))
    node_plan = plan(engine, q("direct_effect", "write_norm", components=("head",)), prompts(TEXTS), LOSS)
    locations = {r.location for r in node_plan.raws}
    assert "attn.probs" not in locations and "attn.z" in locations
    assert Raw("resid.post", 1, "bwd") in node_plan.raws  # g, the gradient before ln_f


def test_gradient_starts_at_the_lowest_needed_layer(tiny_model, monkeypatch):
    loaded = tiny_model("gpt2")
    engine = Engine(loaded)
    query = q("act_times_grad", components=("mlp",), where=(Condition(field="layer", op="=", value=1),))
    node_plan = plan(engine, query, prompts(TEXTS), LOSS)
    assert node_plan.grad_entry == Raw("resid.pre", 1)
    assert {r.layer for r in node_plan.raws} == {1}
    seen = {}
    original = blocks.run_passes

    def spy(*args, **kwargs):
        store = original(*args, **kwargs)
        seen.update({k: v.requires_grad for k, v in store.fwd.items()})
        return store

    monkeypatch.setattr(blocks, "run_passes", spy)
    run(engine, query, prompts(TEXTS), LOSS)
    assert seen and all(seen.values())
    assert all(p.grad is None and not p.requires_grad for p in loaded.model.parameters())
    text = explain(engine, query, prompts(TEXTS), LOSS)
    assert "resid.pre[1]  x.detach().requires_grad_()" in text and "ln_f.scale  detach" in text
    assert "estimated peak memory" in text


def test_trace_plan_detaches_the_layer_norm_scale_and_reads_g_at_the_node(tiny_model):
    engine = Engine(tiny_model("gpt2"))
    trace = Trace(node=NodeRef(component="attn", layer=1, index=0, token=-1, key=0), via="q")
    node_plan = plan(engine, q("direct_effect", trace=trace), prompts(TEXTS), None)
    assert node_plan.g == Raw("resid.pre", 1, "bwd")
    assert set(node_plan.trace.detach) == {("ln1.scale", 1), ("attn.k", 1)}
    assert [p.site.upstream for p in node_plan.sites if p.site.kind == "mlp"] == [True, False]


@pytest.mark.parametrize(
    "query, loss, message",
    [
        (q("act_times_grad"), None, "needs a loss"),
        (q("act", trace=Trace(node=NodeRef(component="mlp", layer=0, index=1))), None, "trace needs a token"),
        (q("act", trace=Trace(node=NodeRef(component="attn", layer=0, index=1, token=-1))), None, "key token"),
        (q("act", trace=Trace(node=NodeRef(component="mlp", layer=9, index=1, token=-1))), None, "out of range"),
        (q("act", components=("mlp_sae",)), None, "no autoencoder"),
        (q("act", by=("prompt",), over_prompts="mean"), None, "over prompts"),
    ],
)
def test_errors_are_tdbql_errors(tiny_model, query, loss, message):
    with pytest.raises(TdbqlError, match=message):
        run(Engine(tiny_model("gpt2")), query, prompts(TEXTS), loss)


def test_token_outside_a_prompt_is_an_error(tiny_model):
    from tdbql.query.plan import Ablation

    query = q("act", ablations=(Ablation(node=NodeRef(component="mlp", layer=0, index=1, token=-40), value=0.0),))
    with pytest.raises(TdbqlError, match="outside prompt"):
        run(Engine(tiny_model("gpt2")), query, prompts(TEXTS), None)


def test_attrib_patch_needs_pairs_of_equal_length(tiny_model):
    engine = Engine(tiny_model("gpt2"))
    with pytest.raises(TdbqlError, match="even number"):
        run(engine, q("attrib_patch"), prompts(TEXTS[:1]), LOSS)
    with pytest.raises(TdbqlError, match="must match"):
        run(engine, q("attrib_patch"), prompts(TEXTS), LOSS)


def test_per_prompt_targets_override_the_loss(tiny_model):
    loaded = tiny_model("gpt2")
    engine = Engine(loaded, batch_size=2)
    query = q("grad", mode="select", k=None, components=("mlp",))
    mixed = [PromptRow(prompt_id=0, text=TEXTS[0], target=" John", distractor=" Mary"),
             PromptRow(prompt_id=1, text=TEXTS[1])]
    flipped = run(engine, query, mixed, LOSS)["result"].to_pylist()
    plain = run(engine, query, prompts(TEXTS), LOSS)["result"].to_pylist()
    for a, b in zip(flipped, plain):  # prompt 0's loss is negated, prompt 1's unchanged
        sign = -1.0 if a["prompt_id"] == 0 else 1.0
        assert abs(a["grad"] - sign * b["grad"]) < 1e-6


def test_node_table_schema(tiny_model):
    table = run(Engine(tiny_model("gpt2")), q("act_times_grad", "act", components=("attn", "embed")),
                                           prompts(TEXTS), LOSS)["result"]
    assert table.column_names == ["prompt_id", "layer", "component", "unit", "position", "attended", "token",
                                  "attended_token", "rank", "act_times_grad", "act"]
    assert table.schema.field("act").type == pa.float64()
    rows = table.to_pylist()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["attended"] is not None for r in rows if r["component"] == "attn")
    import duckdb

    con = duckdb.connect()
    con.register("result", table)
    con.execute("create table t as select * from result")
    assert con.execute("select count(*) from t").fetchone()[0] == 5


def test_progress_and_batch_size_from_budget(tiny_model):
    loaded = tiny_model("gpt2")
    calls = []
    engine = Engine(loaded, progress=lambda done, total: calls.append((done, total)), memory_budget=1)
    run(engine, q("act"), prompts(TEXTS), None)
    assert calls == [(1, 2), (2, 2)]  # a tiny budget gives one prompt per batch


def test_dispatch_to_lens_and_routes(tiny_model):
    engine = Engine(tiny_model("gpt2"))
    lens = run(engine, LogitLensQuery(k=2, where=(Condition(field="token", op="=", value=-1),)), prompts(TEXTS))
    assert set(lens) == {"result"} and lens["result"].num_rows > 0
    routes = run(engine, RoutesQuery(threshold=0.04), prompts(TEXTS))
    assert set(routes) == {"route_nodes", "route_edges"}


def test_no_prompts_is_an_error(tiny_model):
    with pytest.raises(TdbqlError, match="no prompts"):
        run(Engine(tiny_model("gpt2")), q("act"), [], None)


def test_weights_take_no_gradients(tiny_model):
    loaded = tiny_model("gpt2")
    run(Engine(loaded), q("act_times_grad"), prompts(TEXTS), LOSS)
    assert all(p.grad is None for p in loaded.model.parameters())
    assert torch.is_grad_enabled()


def test_contribution_scalar_equals_contrib_with_ablations_in_one_forward_pass(tiny_model, monkeypatch):
    from tdbql.executor.contrib import contributions
    from tdbql.executor.runtime.hooks import HookSet
    from tdbql.query.plan import Ablation

    loaded = tiny_model("gpt2")
    rows = prompts(TEXTS)
    ablation = Ablation(node=NodeRef(component="mlp", layer=0, index=3), value=0.0)
    query = q("contribution", "act_times_grad", mode="select", k=None, components=("attn", "head", "mlp"),
              ablations=(ablation,))
    forwards = []
    model_forward = loaded.model.forward

    def counting_forward(*args, **kwargs):
        forwards.append(1)
        return model_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", counting_forward)
    table = run(Engine(loaded, batch_size=2), query, rows, LOSS)["result"]
    assert len(forwards) == 1  # two prompts in one batch: one forward for every scalar
    got = {(r["prompt_id"], r["component"], r["layer"], r["unit"], r["position"], r["attended"]): r["contribution"]
           for r in table.to_pylist()}
    monkeypatch.undo()

    def ablate(hooks: HookSet, batch) -> None:
        def hook(x):
            x = x.clone()
            x[:, :, 3] = 0.0
            return x

        hooks.add("mlp.post", 0, hook)

    want = contributions(loaded, rows, components=["attn", "head", "mlp"], add_hooks=ablate).to_pylist()
    assert len(want) == len(got)
    text = explain(Engine(loaded), query, rows, LOSS)
    passes = text.split("passes:")[1].split("hooks:")[0]
    assert passes.strip().startswith("1. per batch: forward (autograd from") and "3." not in passes
    assert "contrib.attn[1]  contribution shares" in text and "contrib.mlp[0]  contribution shares" in text
    for r in want:
        key = (r["prompt_id"], r["component"], r["layer"], r["unit"], r["position"], r["attended"])
        assert abs(got[key] - r["contribution"]) < 1e-6


def test_logprobs_rank_like_logits_and_equal_log_softmax(tiny_model):
    from tdbql.query.plan import LogitsQuery

    loaded = tiny_model("gpt2")
    engine = Engine(loaded, batch_size=2)
    where = (Condition(field="token", op="in", value=(-1, -2)),)
    logits = run(engine, LogitsQuery(k=5, where=where), prompts(TEXTS))["result"]
    logprobs = run(engine, LogitsQuery(k=5, where=where, logprobs=True), prompts(TEXTS))["result"]
    assert "logprob" in logprobs.column_names and "logit" not in logprobs.column_names
    ids = ("prompt_id", "position", "vocab_id", "rank")
    assert [tuple(r[c] for c in ids) for r in logprobs.to_pylist()] == [tuple(r[c] for c in ids) for r in logits.to_pylist()]
    assert logprobs.num_rows == 5 * 2 * len(TEXTS)
    for row in prompts(TEXTS):
        with torch.no_grad():
            want = torch.log_softmax(loaded.model(torch.tensor([loaded.encode(row.text)]))[0].double(), -1)
        for r in logprobs.to_pylist():
            if r["prompt_id"] == row.prompt_id:
                assert abs(r["logprob"] - float(want[r["position"], r["vocab_id"]])) < 1e-5
                assert abs(r["prob"] - float(want[r["position"], r["vocab_id"]].exp())) < 1e-6


def _measured_bytes(engine: Engine, plan, rows) -> int:
    """Bytes of the tensors one batch really holds in its passes, counted deterministically (not
    RSS): the distinct storages autograd saves for the backward (weights excluded), the tensors and
    gradients the hooks capture, and the logits with their gradient. Every tensor is kept alive
    until the end so a freed address cannot be reused and counted twice."""
    from tdbql.executor.runtime.batching import batches

    weights = {p.untyped_storage().data_ptr() for p in engine.loaded.model.parameters()}
    alive: dict[int, torch.Tensor] = {}

    def keep(x: torch.Tensor) -> None:
        ptr = x.untyped_storage().data_ptr()
        if ptr not in weights:
            alive.setdefault(ptr, x)

    model = engine.loaded.model
    forward = model.forward

    def forward_keeping_logits(*args, **kwargs):
        logits = forward(*args, **kwargs)
        keep(logits)
        if logits.requires_grad:
            logits.register_hook(lambda g: keep(g))
        return logits

    model.forward = forward_keeping_logits
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda x: (keep(x), x)[1], lambda x: x):
            store = run_passes(engine.loaded, plan, next(batches(engine.loaded, rows, max_prompts=len(rows))), Interventions())
    finally:
        del model.forward
    for x in [*store.fwd.values(), *store.grads.values(), *store.tangents.values()]:
        keep(x)
    return sum(x.untyped_storage().nbytes() for x in alive.values())


@pytest.mark.parametrize("scalar, loss", [("act_times_grad", LOSS), ("act", None), ("direct_effect", LOSS)])
def test_memory_estimate_tracks_the_tensors_a_batch_holds(tiny_model, scalar, loss):
    engine = Engine(tiny_model("gpt2"))
    query = q(scalar, components=("mlp", "attn") if scalar != "direct_effect" else ("mlp", "head"))
    rows = prompts(TEXTS * 2)
    node_plan = plan(engine, query, rows, loss)
    estimate = engine.estimate_memory(node_plan, rows)
    assert estimate.n_tokens == max(len(engine.loaded.encode(t)) for t in TEXTS)  # real tokens, not characters
    assert estimate.weights == sum(p.numel() * p.element_size() for p in engine.loaded.model.parameters())
    measured = {n: _measured_bytes(engine, node_plan, rows[:n]) for n in (1, 2, 4)}
    for n, got in measured.items():
        want = estimate.peak(n) - estimate.weights
        assert got / 3 <= want <= 3 * got, (n, want, got, estimate.parts)
    # what we measure grows linearly (up to the padding mask, absent for a single prompt)...
    assert measured[4] - measured[2] == pytest.approx(2 * (measured[2] - measured[1]), rel=0.05)
    widths = [estimate.peak(n) - estimate.peak(n - 1) for n in (2, 3, 4)]
    assert widths == [estimate.per_prompt] * 3  # ...and so is the estimate


def test_memory_estimate_counts_autograd_only_from_the_gradient_entry(tiny_model):
    engine = Engine(tiny_model("gpt2"))
    rows = prompts(TEXTS)
    top = q("act_times_grad", components=("mlp",), where=(Condition(field="layer", op="=", value=1),))
    everything = q("act_times_grad", components=("mlp",))
    forward_only = q("act", components=("mlp",))
    saved = {name: engine.estimate_memory(plan(engine, query, rows, LOSS), rows).parts["saved"]
             for name, query in [("top", top), ("all", everything), ("forward", forward_only)]}
    assert saved["forward"] == 0 < saved["top"] < saved["all"]
    assert Engine(tiny_model("gpt2"), memory_budget=10**12).plan_batch_size(None, rows) == 64
