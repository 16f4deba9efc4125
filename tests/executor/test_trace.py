"""Tracing: the objective is a node's pre-activation (layer-norm scale detached). The engine's
scalars must equal plain autograd from that pre-activation, written by hand with hooks; direct
effects use the gradient at the residual the node reads and are zero for nodes not strictly
upstream. `in_edge` downstream of the trace equals a hand-derived forward-mode derivative."""

from __future__ import annotations

import math

import pytest

from tdbql.query.plan import NodeQuery, NodeRef, ScalarSpec, Trace

from tests.executor.test_scalars import SCALARS, Reference, assert_matches, engine_rows, expected, prompts, random_sae

TEXTS = ["When Mary and John went to the store", "The cat sat on the mat"]


def traced(loaded, trace: Trace, components, scalars=SCALARS):
    query = NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in scalars), components=components,
                      trace=trace)
    return engine_rows(loaded, query, prompts(TEXTS), loss=None)


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
    from tdbql.query.plan import TdbqlError

    loaded = tiny_model("gpt2")
    with pytest.raises(TdbqlError, match="in_edge needs a traced node"):
        Engine(loaded).run(NodeQuery(mode="topk", k=3, scalars=(ScalarSpec(name="in_edge"),)), prompts(TEXTS))
