"""Tracing: the objective is a node's pre-activation (layer-norm scale detached). The engine's
scalars must equal plain autograd from that pre-activation, written by hand with hooks; direct
effects use the gradient at the residual the node reads and are zero for nodes not strictly
upstream. `in_edge` downstream of the trace equals a hand-derived forward-mode derivative.
A trace `via v` is A·(v W_O)·stopgrad(g_down) with g_down the loss gradient after the layer."""

from __future__ import annotations

import math

import pytest
import torch
from tdbql.query.plan import NodeQuery, NodeRef, ScalarSpec, Trace

from tests.executor.engine_helpers import explain, run
from tests.executor.test_scalars import (
    LOSS,
    SCALARS,
    Reference,
    assert_matches,
    engine_rows,
    expected,
    prompts,
    random_sae,
)

TEXTS = ["When Mary and John went to the store", "The cat sat on the mat"]


def traced(loaded, trace: Trace, components, scalars=SCALARS, loss=None):
    query = NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in scalars), components=components,
                      trace=trace)
    return engine_rows(loaded, query, prompts(TEXTS), loss=loss)


def reference(loaded, objective, extra, read, upstream):
    out = {}
    for row in prompts(TEXTS):
        ref = Reference(loaded, row.text, objective=objective, extra=extra)
        g = ref.grad(*read)
        for (comp, layer, unit, t, u), values in expected(ref, g, upstream).items():
            out[(row.prompt_id, comp, layer, unit, t, u)] = values
    return out


def _detach(*locations):
    def add(hooks):
        for loc, layer in locations:
            hooks.add(loc, layer, lambda x: x.detach())

    return add


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_trace_mlp_neuron(tiny_model, arch):
    loaded = tiny_model(arch)
    parallel = loaded.config.parallel_residual
    n = 5
    got = traced(loaded, Trace(node=NodeRef(component="mlp", layer=1, index=n, token=-1)), ("mlp", "attn", "head", "embed"))

    def upstream(kind, layer):  # writes before the MLP of layer 1 reads the residual
        return layer is None or layer < 1 or (kind == "attn" and layer == 1 and not parallel)

    want = reference(
        loaded,
        objective=lambda r: r.x[("mlp.pre", 1)][0, -1, n],
        extra=_detach(("ln2.scale", 1)),
        read=("resid.pre" if parallel else "resid.mid", 1),
        upstream=upstream,
    )
    assert_matches(got, want, SCALARS, ("mlp", "attn", "head", "embed"))
    # the traced layer's own neurons and everything after get no gradient
    assert all(r["grad"] == 0 for k, r in got.items() if k[1] == "mlp" and k[2] == 1)


@pytest.mark.parametrize("via", ["q", "k", "qk"])
def test_trace_attention_logit_via_q_k(tiny_model, via):
    loaded = tiny_model("gpt2")
    h, key = 2, 1
    trace = Trace(node=NodeRef(component="attn", layer=1, index=h, token=-1, key=key), via=via)
    got = traced(loaded, trace, ("mlp", "attn", "embed"))
    detach = [("ln1.scale", 1)] + ([("attn.k", 1)] if via == "q" else [("attn.q", 1)] if via == "k" else [])
    want = reference(
        loaded,
        objective=lambda r: r.x[("attn.logits", 1)][0, h, -1, key],
        extra=_detach(*detach),
        read=("resid.pre", 1),
        upstream=lambda kind, layer: layer is None or layer < 1,
    )
    assert_matches(got, want, SCALARS, ("mlp", "attn", "embed"))


def _value_objective(loaded, h: int, key: int | None):
    """The V-trace scalar by hand for one prompt: g_down = ∂(logit diff)/∂attn.out[1] at the last
    token (its own autograd.grad, so no graph: stopgrad), times A[-1,u,h] v[u,h] W_O[h]."""
    target, distractor = loaded.encode(" Mary")[0], loaded.encode(" John")[0]
    group = loaded.config.n_heads // loaded.config.n_kv_heads
    W_O = loaded.model.W_O(1)[h]  # (d_head, d_model)

    def objective(r):
        loss = r.logits[0, -1, target] - r.logits[0, -1, distractor]
        (g_attn_out,) = torch.autograd.grad(loss, r.x[("attn.out", 1)], retain_graph=True)
        for x in r.x.values():  # autograd.grad also fills retain_grad() tensors: start the trace clean
            x.grad = None
        g_down = g_attn_out[0, -1]  # (d_model,)
        A = r.x[("attn.probs", 1)][0, h, -1]  # (key,)
        write = r.x[("attn.v", 1)][0, :, h // group] @ W_O  # (key, d_model)
        per_key = A * (write @ g_down)
        return per_key.sum() if key is None else per_key[key]

    return objective


@pytest.mark.parametrize("key", [0, None])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trace_attention_via_v(tiny_model, arch, key):
    loaded = tiny_model(arch)
    h = 2
    trace = Trace(node=NodeRef(component="attn", layer=1, index=h, token=-1, key=key), via="v")
    components = ("mlp", "attn", "head", "embed")
    got = traced(loaded, trace, components, loss=LOSS)
    want = reference(
        loaded,
        objective=_value_objective(loaded, h, key),
        extra=_detach(("ln1.scale", 1), ("attn.q", 1), ("attn.k", 1), ("ln_f.scale", None)),
        read=("resid.pre", 1),
        upstream=lambda kind, layer: layer is None or layer < 1,
    )
    assert_matches(got, want, SCALARS, components)
    # the V path is the only one attached: layer 0 gets gradient, layer >= 1 (not upstream) gets 0
    assert any(abs(r["grad"]) > 1e-3 for k, r in got.items() if k[1] == "mlp" and k[2] == 0)
    later = [r for k, r in got.items() if k[2] is not None and k[2] >= 1]
    assert later and all(r[s] == 0 for r in later for s in ("grad", "act_times_grad", "direct_effect"))


def test_in_edge_downstream_of_a_keyless_v_trace_is_the_whole_head_write(tiny_model):
    """Without a key the traced write is z[t,h] W_O[h] (all keys u <= t); MLP neurons of layer 1
    read it through the frozen ln2 scale."""
    loaded = tiny_model("gpt2")
    m, h = loaded.model, 1
    trace = Trace(node=NodeRef(component="attn", layer=0, index=h, token=-1), via="v")
    got = traced(loaded, trace, ("mlp",), scalars=("in_edge",), loss=LOSS)
    for row in prompts(TEXTS):
        scales = {}
        ref = Reference(loaded, row.text, extra=lambda hooks: hooks.add(
            "ln2.scale", 1, lambda x: scales.__setitem__("ln2", x.detach()[0])))
        t = ref.T - 1
        w = ref.val("attn.z", 0)[t, h] @ m.W_O(0)[h]  # (d_model,)
        want = ((w - w.mean()) / scales["ln2"][t] * m.blocks[1].ln2.weight) @ m.W_in(1)  # (d_mlp,)
        for j in range(loaded.config.d_mlp):
            assert abs(got[(row.prompt_id, "mlp", 1, j, t, None)]["in_edge"] - float(want[j])) < 1e-5
            assert got[(row.prompt_id, "mlp", 1, j, t - 1, None)]["in_edge"] == 0


def test_trace_via_v_needs_a_loss_and_explain_counts_the_extra_backward(tiny_model):
    from tdbql.executor.engine import Engine
    from tdbql.query.errors import TdbqlError

    loaded = tiny_model("gpt2")
    trace = Trace(node=NodeRef(component="attn", layer=1, index=2, token=-1), via="v")
    query = NodeQuery(mode="topk", k=5, scalars=(ScalarSpec(name="act_times_grad"),), trace=trace)
    with pytest.raises(TdbqlError, match="via v .* loss"):
        run(Engine(loaded), query, prompts(TEXTS), None)
    text = explain(Engine(loaded), query, prompts(TEXTS), LOSS)
    assert "one extra backward a V trace costs" in text
    assert "summed over keys u <= t" in text
    for hook in ("attn.q[1]  detach", "attn.k[1]  detach", "ln1.scale[1]  detach", "ln_f.scale  detach"):
        assert hook in text


def test_trace_sae_latent(tiny_model):
    loaded = tiny_model("gpt2")
    ae = random_sae("mlp", 0, loaded.config.d_mlp, 24, 1)
    loaded.attach_sae("mlp", 0, ae)
    i = 3
    got = traced(loaded, Trace(node=NodeRef(component="mlp_sae", layer=0, index=i, token=-2)), ("attn", "embed"))
    want = reference(
        loaded,
        objective=lambda r: ae.pre_activation(r.x[("mlp.post", 0)][0, -2])[i],
        extra=_detach(("ln2.scale", 0)),
        read=("resid.mid", 0),
        upstream=lambda kind, layer: layer is None or (kind == "attn" and layer == 0),
    )
    assert_matches(got, want, SCALARS, ("attn", "embed"))


def test_in_edge_upstream_by_gradient_downstream_by_jvp(tiny_model):
    loaded = tiny_model("gpt2")
    m, cfg = loaded.model, loaded.config
    n = 7
    got = traced(loaded, Trace(node=NodeRef(component="mlp", layer=0, index=n, token=-1)), ("mlp", "attn"),
                 scalars=("in_edge", "direct_effect"))
    for row in prompts(TEXTS):
        scales = {}

        def keep_scales(hooks):
            for layer in range(cfg.n_layers):
                for loc in ("ln1.scale", "ln2.scale"):
                    hooks.add(loc, layer, lambda x, key=(loc, layer): scales.__setitem__(key, x.detach()[0]))

        ref = Reference(loaded, row.text, objective=lambda r: r.x[("mlp.pre", 0)][0, -1, n],
                        extra=lambda h: (keep_scales(h), h.add("ln2.scale", 0, lambda x: x.detach())))
        T, t = ref.T, ref.T - 1
        # upstream: attention of layer 0 -> edge by gradient = its direct effect on the traced node
        for key, r in got.items():
            if key[0] == row.prompt_id and key[1] == "attn" and key[2] == 0:
                assert r["in_edge"] == r["direct_effect"]
        # downstream: the neuron's write w at token t, read by layer 1 through frozen layer norms
        w = ref.val("mlp.post", 0)[t, n] * m.W_out(0)[n]

        def read(loc, layer, block_norm):
            centred = w - w.mean()
            return centred / scales[(loc, layer)][t] * block_norm.weight

        d_mlp_pre = read("ln2.scale", 1, m.blocks[1].ln2) @ m.W_in(1)  # (d_mlp,)
        for u in range(T):
            for j in range(cfg.d_mlp):
                want = float(d_mlp_pre[j]) if u == t else 0.0
                assert abs(got[(row.prompt_id, "mlp", 1, j, u, None)]["in_edge"] - want) < 1e-5
        x1 = read("ln1.scale", 1, m.blocks[1].ln1)
        q, k = ref.val("attn.q", 1), ref.val("attn.k", 1)  # (token, head, d_head)
        for h in range(cfg.n_heads):
            dq = x1 @ m.W_Q(1)[h]
            dk = x1 @ m.W_K(1)[h]
            for tq in range(T):
                for u in range(tq + 1):
                    want = ((dq @ k[u, h]) if tq == t else 0.0) + ((q[tq, h] @ dk) if u == t else 0.0)
                    want = float(want) / math.sqrt(cfg.d_head)
                    assert abs(got[(row.prompt_id, "attn", 1, h, tq, u)]["in_edge"] - want) < 1e-5


def test_in_edge_needs_a_trace(tiny_model):
    from tdbql.executor.engine import Engine
    from tdbql.query.errors import TdbqlError

    loaded = tiny_model("gpt2")
    with pytest.raises(TdbqlError, match="in_edge needs a traced node"):
        run(Engine(loaded), NodeQuery(mode="topk", k=3, scalars=(ScalarSpec(name="in_edge"),)), prompts(TEXTS))
