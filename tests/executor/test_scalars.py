"""Every scalar x component against plain autograd on hook-captured tensors.

The reference runs each prompt alone (no padding), captures tensors with one hook per location,
calls `retain_grad()` and `loss.backward()`, and writes every scalar's formula out by hand with
einsum. The engine runs the prompts batched (right padding) through its derivers. Values must
agree within 1e-5 (fp32).
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from tdbql.executor.engine import Engine
from tdbql.executor.runtime.autoencoder import Autoencoder
from tdbql.executor.runtime.hooks import HookSet
from tdbql.query.catalog import COMPONENTS, SAE_SITES, latent_component
from tdbql.query.context import PromptRow
from tdbql.query.plan import Loss, NodeQuery, ScalarSpec

from tests.executor.engine_helpers import run

TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The cat sat on the mat",
    "one two three four five six",
]
LOSS = Loss(targets=(" Mary",), distractors=(" John",))
SCALARS = ("act", "grad", "act_times_grad", "write_norm", "direct_effect")
TOL = 1e-5
# every family of executor/runtime/config.py; the post-norm ones (Gemma 2/3, OLMo 2) divide each
# unit write at token t by the post-norm's scale there (W_O and W_out carry its weight)
FAMILIES = ["gpt2", "neox", "llama", "qwen3", "phi3", "olmo2", "gemma2", "gemma3"]
POST_NORMS = ("ln1_post.scale", "ln2_post.scale")


def prompts(texts=TEXTS) -> list[PromptRow]:
    return [PromptRow(prompt_id=10 + i, text=t) for i, t in enumerate(texts)]


# --- the reference: one prompt, plain autograd ---------------------------------------------------------


class Reference:
    """Captures every listed location for one prompt; gradients via retain_grad + backward."""

    LOCATIONS = ("attn.q", "attn.k", "attn.v", "attn.probs", "mlp.post", "mlp.pre", "attn.logits", "resid.mid", "resid.pre",
                 "resid.post", "attn.z", "attn.out")

    def __init__(self, loaded, text: str, *, objective=None, extra=None, freeze_ln_f=True) -> None:
        model = loaded.model
        self.loaded, self.model = loaded, model
        ids = torch.tensor([loaded.encode(text)])
        self.T = ids.shape[1]
        self.x: dict = {}
        hooks = HookSet()
        if extra is not None:
            extra(hooks)
        hooks.add("resid.embed", None, self._leaf)
        for layer in range(model.cfg.n_layers):
            for loc in self.LOCATIONS + POST_NORMS * model.cfg.post_norms:
                hooks.add(loc, layer, self._keep(loc, layer))
            for site in SAE_SITES:
                if (site, layer) in loaded.saes:
                    hooks.add(f"sae.{site}.latent", layer, self._keep(f"sae.{site}.latent", layer))
                    hooks.add(f"sae.{site}.error", layer, self._keep(f"sae.{site}.error", layer))
        if freeze_ln_f and objective is None:
            hooks.add("ln_f.scale", None, lambda s: s.detach())
        handle = model.ln_f.register_forward_pre_hook(self._final_residual)
        try:
            logits = model(ids, hooks=hooks)
        finally:
            handle.remove()
        self.logits = logits
        if objective is None:
            target, distractor = loaded.encode(" Mary")[0], loaded.encode(" John")[0]
            self.loss = logits[0, -1, target] - logits[0, -1, distractor]
        else:
            self.loss = objective(self)
        self.loss.backward()

    def _leaf(self, x):
        x = x.detach().requires_grad_()
        self.x[("resid.embed", None)] = x
        return x

    def _keep(self, loc, layer):
        def hook(x):
            if x.requires_grad:
                x.retain_grad()
            self.x[(loc, layer)] = x

        return hook

    def _final_residual(self, module, args):
        args[0].retain_grad()
        self.x[("final", None)] = args[0]

    def val(self, loc, layer=None):
        return self.x[(loc, layer)][0].detach()

    def inverse_scale(self, site, layer):
        """(T, 1): 1 / the post-norm scale dividing `site`'s writes (1 without post-norms)."""
        if not self.model.cfg.post_norms:
            return torch.ones(self.T, 1)
        return 1 / self.val("ln1_post.scale" if site == "attn" else "ln2_post.scale", layer)

    def grad(self, loc, layer=None):
        g = self.x[(loc, layer)].grad
        return torch.zeros_like(self.x[(loc, layer)][0]) if g is None else g[0]


def expected(ref: Reference, g: torch.Tensor, upstream=lambda kind, layer: True) -> dict:
    """(component, layer, unit, position, attended) -> {scalar: value}, written out by hand."""
    m, out = ref.model, defaultdict(dict)
    cfg = m.cfg
    group = cfg.n_heads // cfg.n_kv_heads
    for L in range(cfg.n_layers):
        a, da = ref.val("mlp.post", L), ref.grad("mlp.post", L)  # (t, n)
        W_out, inv2, inv1 = m.W_out(L), ref.inverse_scale("mlp", L), ref.inverse_scale("attn", L)
        de = a * (g @ W_out.T) * inv2 if upstream("mlp", L) else torch.zeros_like(a)
        for (t, n), _ in _items(a):
            out[("mlp", L, n, t, None)] = {
                "act": a[t, n], "grad": da[t, n], "act_times_grad": a[t, n] * da[t, n],
                "write_norm": a[t, n] * W_out[n].norm() * inv2[t, 0], "direct_effect": de[t, n],
            }
        A, dA = ref.val("attn.probs", L), ref.grad("attn.probs", L)  # (h, t, u)
        v = ref.val("attn.v", L)  # (u, kv_head, d_head)
        W_O = m.W_O(L)
        for h in range(cfg.n_heads):
            vw = v[:, h // group] @ W_O[h]  # (u, d_model)
            for t in range(ref.T):
                head_write = (A[h, t, :, None] * vw).sum(0) * inv1[t, 0]
                heads = defaultdict(float)
                for u in range(t + 1):
                    row = {
                        "act": A[h, t, u], "grad": dA[h, t, u], "act_times_grad": A[h, t, u] * dA[h, t, u],
                        "write_norm": A[h, t, u] * vw[u].norm() * inv1[t, 0],
                        "direct_effect": A[h, t, u] * (vw[u] @ g[t]) * inv1[t, 0] if upstream("attn", L) else 0.0,
                    }
                    out[("attn", L, h, t, u)] = row
                    for k in ("act", "grad", "act_times_grad", "direct_effect"):
                        heads[k] = heads[k] + row[k]
                heads["write_norm"] = head_write.norm()
                out[("head", L, h, t, None)] = dict(heads)
    x, dx = ref.val("resid.embed"), ref.grad("resid.embed")
    for t in range(ref.T):
        tok = (x[t] * dx[t]).sum()
        out[("embed", None, None, t, None)] = {
            "act": 1.0, "grad": tok, "act_times_grad": tok, "write_norm": x[t].norm(),
            "direct_effect": x[t] @ g[t], "token_attribution": tok,
        }
    for (site, L), ae in ref.loaded.saes.items():
        z, dz = ref.val(f"sae.{site}.latent", L), ref.grad(f"sae.{site}.latent", L)
        e, de_ = ref.val(f"sae.{site}.error", L), ref.grad(f"sae.{site}.error", L)
        D = ae.W_dec @ m.W_out(L) if site == "mlp" else ae.W_dec
        e_write = e @ m.W_out(L) if site == "mlp" else e
        latent = latent_component(site)
        up = upstream(latent, L)
        for (t, i), _ in _items(z):
            out[(latent, L, i, t, None)] = {
                "act": z[t, i], "grad": dz[t, i], "act_times_grad": z[t, i] * dz[t, i],
                "write_norm": z[t, i] * D[i].norm(), "direct_effect": z[t, i] * (D[i] @ g[t]) if up else 0.0,
            }
        for t in range(ref.T):
            eg = (e[t] * de_[t]).sum()
            out[(COMPONENTS[latent].error, L, None, t, None)] = {
                "act": 1.0, "grad": eg, "act_times_grad": eg, "write_norm": e_write[t].norm(),
                "direct_effect": e_write[t] @ g[t] if up else 0.0, "sae_error": e[t].norm(),
            }
    return out


def _items(x: torch.Tensor):
    for index in torch.cartesian_prod(*(torch.arange(s) for s in x.shape)).tolist():
        yield tuple(index), None


def engine_rows(loaded, query: NodeQuery, rows, loss=LOSS, batch_size=2) -> dict:
    table = run(Engine(loaded, batch_size=batch_size), query, rows, loss)["result"]
    out = {}
    for r in table.to_pylist():
        key = (r["prompt_id"], r["component"], r["layer"], r["unit"], r["position"], r["attended"])
        out[key] = r
    return out


def assert_matches(got: dict, want: dict, scalars, components) -> None:
    want = {k: v for k, v in want.items() if k[1] in components}
    assert set(got) == set(want), (sorted(set(got) ^ set(want))[:5])
    worst = 0.0
    for key, row in want.items():
        for s in scalars:
            if s not in row:
                assert got[key][s] is None, (key, s)
                continue
            diff = abs(got[key][s] - float(row[s]))
            assert diff <= TOL * max(1.0, abs(float(row[s]))), (key, s, got[key][s], float(row[s]))
            worst = max(worst, diff)
    assert worst < 1e-4


def reference_table(loaded, rows, **kw) -> dict:
    out = {}
    for row in rows:
        ref = Reference(loaded, row.text, **kw)
        g = ref.grad("final")
        for (comp, layer, unit, t, u), values in expected(ref, g).items():
            out[(row.prompt_id, comp, layer, unit, t, u)] = values
    return out


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILIES)
def test_node_scalars_equal_plain_autograd(tiny_model, arch):
    loaded = tiny_model(arch)
    rows = prompts()
    components = ("mlp", "attn", "head", "embed")
    query = NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in SCALARS), components=components)
    assert_matches(engine_rows(loaded, query, rows), reference_table(loaded, rows), SCALARS, components)


def random_sae(site: str, layer: int, d_in: int, n_latents: int, seed: int) -> Autoencoder:
    gen = torch.Generator().manual_seed(seed)
    return Autoencoder(
        torch.randn(d_in, n_latents, generator=gen) * 0.3,
        torch.randn(n_latents, generator=gen) * 0.1,
        torch.randn(n_latents, d_in, generator=gen) * 0.3,
        torch.randn(d_in, generator=gen) * 0.1,
        site=site, layer=layer,
    )


@pytest.fixture
def sae_model(tiny_model):
    loaded = tiny_model("gpt2")
    cfg = loaded.config
    loaded.attach_sae("mlp", 0, random_sae("mlp", 0, cfg.d_mlp, 24, 1))
    loaded.attach_sae("attn", 1, random_sae("attn", 1, cfg.d_model, 16, 2))
    loaded.attach_sae("resid", cfg.n_layers - 1, random_sae("resid", cfg.n_layers - 1, cfg.d_model, 16, 3))
    return loaded


def test_sae_latents_and_errors_equal_plain_autograd(sae_model):
    rows = prompts()
    components = ("mlp_sae", "attn_sae", "resid_sae")
    scalars = (*SCALARS, "sae_error")
    query = NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in scalars), components=components)
    got = engine_rows(sae_model, query, rows)
    kinds = (*components, "mlp_sae_error", "attn_sae_error", "resid_sae_error")
    assert_matches(got, reference_table(sae_model, rows), scalars, kinds)


def test_token_attribution_is_embedding_times_gradient(tiny_model):
    loaded = tiny_model("gpt2")
    rows = prompts()
    query = NodeQuery(mode="select", scalars=(ScalarSpec(name="token_attribution"),))
    got = engine_rows(loaded, query, rows)
    assert {k[1] for k in got} == {"embed"}  # the scalar's home component when none is named
    assert_matches(got, reference_table(loaded, rows), ("token_attribution",), ("embed",))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3", "phi3", "olmo2", "gemma3"])
def test_direct_effects_add_up_to_the_loss(tiny_model, arch):
    """Σ direct effects (neurons, attention (t,u,h), embedding) + bias paths = logit difference
    (post-norm families too: with each post-norm's scale held, the units' writes sum to its output)."""
    loaded = tiny_model(arch)
    m = loaded.model
    rows = prompts()
    query = NodeQuery(mode="select", scalars=(ScalarSpec(name="direct_effect"),), components=("mlp", "attn", "embed"))
    table = run(Engine(loaded, batch_size=3), query, rows, LOSS)["result"]
    total = defaultdict(float)
    for r in table.to_pylist():
        total[r["prompt_id"]] += r["direct_effect"]
    target, distractor = loaded.encode(" Mary")[0], loaded.encode(" John")[0]
    delta = m.W_U[:, target] - m.W_U[:, distractor]
    for row in rows:
        ref = Reference(loaded, row.text)
        g = ref.grad("final")[-1]
        bias = sum(_bias(m.b_O(L)) + _bias(m.b_out(L)) for L in range(m.cfg.n_layers))
        const = float(g @ bias) if torch.is_tensor(bias) else 0.0
        const += (float(delta @ m.final_norm_bias) if m.final_norm_bias is not None else 0.0)
        assert math.isclose(total[row.prompt_id] + const, float(ref.loss.detach()), abs_tol=1e-4), row.prompt_id


def _bias(b):
    return 0.0 if b is None else b


def test_logits_and_logprobs_top_k(tiny_model):
    from tdbql.query.plan import Condition, LogitsQuery

    loaded = tiny_model("gpt2")
    rows = prompts()
    table = run(Engine(loaded, batch_size=2), 
        LogitsQuery(k=4, where=(Condition(field="token", op="=", value=-1),)), rows
    )["result"]
    got = table.to_pylist()
    assert len(got) == 4 * len(rows)
    for row in rows:
        logits = loaded.model(torch.tensor([loaded.encode(row.text)]))[0, -1]
        want = torch.sort(logits, descending=True, stable=True)
        probs = torch.softmax(logits, -1)
        mine = [r for r in got if r["prompt_id"] == row.prompt_id]
        assert [r["rank"] for r in mine] == [1, 2, 3, 4]
        assert [r["vocab_id"] for r in mine] == want.indices[:4].tolist()
        assert all(r["position"] == len(loaded.encode(row.text)) - 1 and r["layer"] is None for r in mine)
        for r in mine:
            assert abs(r["logit"] - float(logits[r["vocab_id"]])) < 1e-5
            assert abs(r["prob"] - float(probs[r["vocab_id"]])) < 1e-6
            assert r["token"] == loaded.token_str(r["vocab_id"])


def test_logprob_loss_gradient(tiny_model):
    loaded = tiny_model("gpt2")
    rows = prompts()[:2]
    loss = Loss(kind="logprob", targets=(" Mary",))
    query = NodeQuery(mode="select", scalars=(ScalarSpec(name="grad"),), components=("mlp",))
    got = engine_rows(loaded, query, rows, loss=loss)
    target = loaded.encode(" Mary")[0]
    for row in rows:  # reference with the ln_f scale frozen, as the engine does
        ref = Reference(
            loaded, row.text,
            objective=lambda r: torch.log_softmax(r.logits[0, -1], -1)[target],
            extra=lambda h: h.add("ln_f.scale", None, lambda s: s.detach()),
        )
        da = ref.grad("mlp.post", 1)
        for t in range(ref.T):
            for n in range(da.shape[1]):
                assert abs(got[(row.prompt_id, "mlp", 1, n, t, None)]["grad"] - float(da[t, n])) < TOL


def test_attrib_patch_pairs_clean_and_corrupted(tiny_model):
    loaded = tiny_model("gpt2")
    pair_texts = ["When Mary and John went to the store", "When John and Mary went to the store",
                  "The cat sat on the mat", "The mat sat on the cat"]
    rows = prompts(pair_texts)
    assert len(loaded.encode(pair_texts[0])) == len(loaded.encode(pair_texts[1]))
    assert len(loaded.encode(pair_texts[2])) == len(loaded.encode(pair_texts[3]))
    query = NodeQuery(mode="select", scalars=(ScalarSpec(name="attrib_patch"),), components=("mlp", "head", "embed"))
    got = engine_rows(loaded, query, rows, batch_size=4)
    assert {k[0] for k in got} == {rows[0].prompt_id, rows[2].prompt_id}  # clean prompts only
    for clean, corrupt in ((rows[0], rows[1]), (rows[2], rows[3])):
        c, x = Reference(loaded, clean.text), Reference(loaded, corrupt.text)
        for L in range(loaded.config.n_layers):
            want = (c.val("mlp.post", L) - x.val("mlp.post", L)) * x.grad("mlp.post", L)
            for (t, n), _ in _items(want):
                assert abs(got[(clean.prompt_id, "mlp", L, n, t, None)]["attrib_patch"] - float(want[t, n])) < TOL
            heads = ((c.val("attn.probs", L) - x.val("attn.probs", L)) * x.grad("attn.probs", L)).sum(-1)
            for (h, t), _ in _items(heads):
                assert abs(got[(clean.prompt_id, "head", L, h, t, None)]["attrib_patch"] - float(heads[h, t])) < TOL
        emb = ((c.val("resid.embed") - x.val("resid.embed")) * x.grad("resid.embed")).sum(-1)
        for t in range(c.T):
            assert abs(got[(clean.prompt_id, "embed", None, None, t, None)]["attrib_patch"] - float(emb[t])) < TOL
