"""Traces, in_edge, contributions, the lens and ablation on the families with post-norms, q/k
norms and soft caps (Gemma 2/3, OLMo 2), against hand-written references.

Post-norm families divide every unit write at token t by the post-norm's scale s[t] (W_O and
W_out carry the post-norm's weight): a head's write is z W_O[h] / s1[t], a neuron's a W_out[n] /
s2[t]. The scalars themselves are held to plain autograd in tests/executor/test_scalars.py; here
the rest of the engine is.
"""

from __future__ import annotations

import pytest
import torch
from tdbql.executor import contrib, lens
from tdbql.executor.engine import Engine
from tdbql.executor.runtime.hooks import HookSet
from tdbql.query.context import PromptRow
from tdbql.query.plan import Ablation, LogitLensQuery, NodeQuery, NodeRef, ScalarSpec, Trace, UpvotedQuery

from tests.executor.engine_helpers import run
from tests.executor.test_scalars import LOSS, SCALARS, Reference, assert_matches, engine_rows, expected, prompts

TEXTS = ["When Mary and John went to the store", "The cat sat on the mat"]


def traced(loaded, trace, components, scalars=SCALARS, loss=None):
    query = NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in scalars), components=components,
                      trace=trace)
    return engine_rows(loaded, query, prompts(TEXTS), loss=loss)


def reference(loaded, objective, detach, read, upstream):
    def extra(hooks):
        for loc, layer in detach:
            hooks.add(loc, layer, lambda x: x.detach())

    out = {}
    for row in prompts(TEXTS):
        ref = Reference(loaded, row.text, objective=objective, extra=extra)
        for (comp, layer, unit, t, u), values in expected(ref, ref.grad(*read), upstream).items():
            out[(row.prompt_id, comp, layer, unit, t, u)] = values
    return out


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_trace_mlp_neuron(tiny_model, arch):
    loaded = tiny_model(arch)
    n = 5
    got = traced(loaded, Trace(node=NodeRef(component="mlp", layer=1, index=n, token=-1)), ("mlp", "attn", "head", "embed"))
    want = reference(loaded, lambda r: r.x[("mlp.pre", 1)][0, -1, n], [("ln2.scale", 1)], ("resid.mid", 1),
                     lambda kind, layer: layer is None or layer < 1 or (kind == "attn" and layer == 1))
    assert_matches(got, want, SCALARS, ("mlp", "attn", "head", "embed"))


@pytest.mark.parametrize("arch", ["gemma3", "olmo2"])
def test_trace_attention_logit_holds_the_q_and_k_norm_scales(tiny_model, arch):
    """The traced logit (after q/k norms and, for Gemma, the soft cap) with every norm scale
    before it detached: ln1 (none in OLMo 2), q_norm, k_norm."""
    loaded = tiny_model(arch)
    h, key = 2, 1
    got = traced(loaded, Trace(node=NodeRef(component="attn", layer=1, index=h, token=-1, key=key)), ("mlp", "attn", "embed"))
    detach = [("ln1.scale", 1), ("q_norm.scale", 1), ("k_norm.scale", 1)]
    want = reference(loaded, lambda r: r.x[("attn.logits", 1)][0, h, -1, key], detach, ("resid.pre", 1),
                     lambda kind, layer: layer is None or layer < 1)
    assert_matches(got, want, SCALARS, ("mlp", "attn", "embed"))


def test_trace_via_v_divides_the_head_write_by_the_held_post_norm_scale(tiny_model):
    loaded = tiny_model("gemma2")
    h = 1
    target, distractor = loaded.encode(" Mary")[0], loaded.encode(" John")[0]
    group = loaded.config.n_heads // loaded.config.n_kv_heads
    W_O = loaded.model.W_O(1)[h]

    def objective(r):
        loss = r.logits[0, -1, target] - r.logits[0, -1, distractor]
        (g_mid,) = torch.autograd.grad(loss, r.x[("resid.mid", 1)], retain_graph=True)
        for x in r.x.values():
            x.grad = None
        scale = r.x[("ln1_post.scale", 1)][0, -1].detach()
        write = r.x[("attn.v", 1)][0, :, h // group] @ W_O / scale  # (key, d_model)
        return (r.x[("attn.probs", 1)][0, h, -1] * (write @ g_mid[0, -1])).sum()

    trace = Trace(node=NodeRef(component="attn", layer=1, index=h, token=-1), via="v")
    got = traced(loaded, trace, ("mlp", "attn", "embed"), loss=LOSS)
    detach = [("ln1.scale", 1), ("attn.q", 1), ("attn.k", 1), ("ln_f.scale", None)]
    want = reference(loaded, objective, detach, ("resid.pre", 1), lambda kind, layer: layer is None or layer < 1)
    assert_matches(got, want, SCALARS, ("mlp", "attn", "embed"))
    assert any(abs(r["grad"]) > 1e-3 for k, r in got.items() if k[1] == "mlp" and k[2] == 0)


def test_in_edge_downstream_reads_the_write_over_the_post_norm_scale(tiny_model):
    """A layer-0 neuron's write a W_out[n] / s2[t], read by layer 1's MLP through its frozen
    (1 + w) RMS norm: the JVP of mlp.pre by hand."""
    loaded = tiny_model("gemma2")
    m, n = loaded.model, 7
    got = traced(loaded, Trace(node=NodeRef(component="mlp", layer=0, index=n, token=-1)), ("mlp",), scalars=("in_edge",))
    for row in prompts(TEXTS):
        keep = {}

        def extra(hooks):
            for loc in ("ln2.scale", "ln2_post.scale"):
                for layer in (0, 1):
                    hooks.add(loc, layer, lambda x, key=(loc, layer): keep.__setitem__(key, x.detach()[0]))

        ref = Reference(loaded, row.text, extra=extra)
        t = ref.T - 1
        w = ref.val("mlp.post", 0)[t, n] * m.W_out(0)[n] / keep[("ln2_post.scale", 0)][t]
        want = (w / keep[("ln2.scale", 1)][t] * (1 + m.blocks[1].ln2.weight)) @ m.W_in(1)
        for j in range(loaded.config.d_mlp):
            assert abs(got[(row.prompt_id, "mlp", 1, j, t, None)]["in_edge"] - float(want[j])) < 1e-5
            assert got[(row.prompt_id, "mlp", 1, j, t - 1, None)]["in_edge"] == 0


def _capture(loaded, text, locations):
    saved = {}
    hooks = HookSet()
    for loc in locations:
        for layer in range(loaded.config.n_layers):
            hooks.add(loc, layer, lambda x, key=(loc, layer): saved.__setitem__(key, x[0].detach().double()))
    with torch.no_grad():
        loaded.model(torch.tensor([loaded.encode(text)]), hooks=hooks)
    return saved


def _shares(parts, whole):
    prox = (whole.norm(p=1, dim=-1) - (parts - whole).norm(p=1, dim=-1)).clamp(min=contrib.EPS)
    return prox / prox.sum(0, keepdim=True)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_contributions_split_the_post_normed_write(tiny_model, arch):
    """Materialised parts A[t,u,h] v[u] W_O[h] / s1[t] (they sum to attn.out exactly) and
    a[t,n] W_out[n] / s2[t], normalised with the residual as LLM-TT does."""
    loaded = tiny_model(arch)
    m = loaded.model
    rows = [PromptRow(prompt_id=4, text=TEXTS[0])]
    table = contrib.contributions(loaded, rows, components=("attn", "mlp")).to_pylist()
    locs = ("resid.pre", "attn.probs", "attn.v", "ln1_post.scale", "attn.out", "resid.mid", "mlp.post",
            "ln2_post.scale", "resid.post")
    s = _capture(loaded, TEXTS[0], locs)
    for L in range(loaded.config.n_layers):
        W_O = m.W_O(L).double()
        H = W_O.shape[0]
        v = s[("attn.v", L)].repeat_interleave(H // s[("attn.v", L)].shape[1], dim=1)
        parts = torch.einsum("htu,uhe,hed->tuhd", s[("attn.probs", L)], v, W_O) / s[("ln1_post.scale", L)][:, None, None]
        torch.testing.assert_close(parts.sum((1, 2)), s[("attn.out", L)], atol=1e-5, rtol=0)
        T = parts.shape[0]
        stacked = torch.cat([parts.permute(1, 2, 0, 3).reshape(T * H, T, -1), s[("resid.pre", L)][None]])
        c_attn = _shares(stacked, s[("resid.mid", L)])[:-1].reshape(T, H, T).permute(2, 0, 1)
        neurons = s[("mlp.post", L)].T[..., None] * m.W_out(L).double()[:, None, :] / s[("ln2_post.scale", L)][None]
        c_n = _shares(torch.cat([neurons, s[("resid.mid", L)][None]]), s[("resid.post", L)])[:-1].T
        for r in table:
            if r["layer"] != L:
                continue
            want = c_attn[r["position"], r["attended"], r["unit"]] if r["component"] == "attn" else \
                c_n[r["position"], r["unit"]]
            assert r["contribution"] == pytest.approx(float(want), abs=1e-5), r


def test_contribution_scalar_equals_the_model_level_contributions(tiny_model):
    loaded = tiny_model("gemma3")
    rows = [PromptRow(prompt_id=4, text=TEXTS[1])]
    query = NodeQuery(mode="select", scalars=(ScalarSpec(name="contribution"),), components=("mlp", "attn"))
    got = run(Engine(loaded), query, rows)["result"].to_pylist()
    want = {(r["component"], r["layer"], r["unit"], r["position"], r["attended"]): r["contribution"]
            for r in contrib.contributions(loaded, rows, components=("attn", "mlp")).to_pylist()}
    assert len(got) == len(want)
    for r in got:
        key = (r["component"], r["layer"], r["unit"], r["position"], r["attended"])
        assert r["contribution"] == pytest.approx(want[key], abs=1e-6)


def test_logit_lens_at_the_last_layer_is_the_soft_capped_logits(tiny_model):
    loaded = tiny_model("gemma2")
    rows = [PromptRow(prompt_id=1, text=TEXTS[0])]
    got = lens.logit_lens(loaded, LogitLensQuery(k=3, at="resid.post"), rows).to_pylist()
    with torch.no_grad():
        logits = loaded.model(torch.tensor([loaded.encode(TEXTS[0])]))[0]
    last = [r for r in got if r["layer"] == loaded.config.n_layers - 1]
    assert last
    for r in last:
        assert r["logit"] == pytest.approx(float(logits[r["position"], r["vocab_id"]]), abs=1e-4)
    assert max(abs(r["logit"]) for r in got) < 8.0  # the cap


def test_upvoted_neuron_and_head_writes_are_divided_by_the_post_norm_scale(tiny_model):
    loaded = tiny_model("olmo2")
    m, t = loaded.model, 4
    s = _capture(loaded, TEXTS[1], ("mlp.post", "ln2_post.scale", "attn.z", "ln1_post.scale"))
    rows = [PromptRow(prompt_id=5, text=TEXTS[1])]
    for node, write in [
        (NodeRef(component="mlp", layer=1, index=3, token=t),
         s[("mlp.post", 1)][t, 3] * m.W_out(1)[3].double() / s[("ln2_post.scale", 1)][t]),
        (NodeRef(component="attn", layer=0, index=2, token=t),
         s[("attn.z", 0)][t, 2] @ m.W_O(0)[2].double() / s[("ln1_post.scale", 0)][t]),
    ]:
        got = lens.upvoted(loaded, UpvotedQuery(node=node, k=4), rows).to_pylist()
        scores = lens.score_writes(m, write.float())
        top = scores.topk(4)
        assert [r["vocab_id"] for r in got] == top.indices.tolist()
        assert [r["score"] for r in got] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2", "phi3"])
def test_head_ablation_equals_zeroed_probabilities_by_hand(tiny_model, arch):
    loaded = tiny_model(arch)
    rows = prompts(TEXTS)
    query = NodeQuery(mode="select", scalars=(ScalarSpec(name="act"),), components=("mlp",),
                      ablations=(Ablation(node=NodeRef(component="attn", layer=0, index=1), value=0.0),))
    got = engine_rows(loaded, query, rows)
    for row in rows:
        seen = {}
        hooks = HookSet()

        def zero(p):
            p = p.clone()
            p[:, 1] = 0
            return p

        hooks.add("attn.probs", 0, zero)
        hooks.add("mlp.post", 1, lambda x: seen.__setitem__("post", x[0].detach()))
        with torch.no_grad():
            loaded.model(torch.tensor([loaded.encode(row.text)]), hooks=hooks)
        for (t, n), value in ((tn, seen["post"][tn]) for tn in [(0, 0), (3, 5), (5, 9)]):
            assert got[(row.prompt_id, "mlp", 1, n, t, None)]["act"] == pytest.approx(float(value), abs=1e-5)
