"""Our Transformer against transformers, hook by hook."""

from __future__ import annotations

import pytest
import torch
from tdbql.executor.runtime.hooks import GLOBAL_LOCATIONS, LOCATIONS, HookSet
from tdbql.executor.runtime.model import hook_alias

from tests.executor.conftest import load_hf

ARCHS = ["gpt2", "neox", "neox_serial", "llama", "llama_linear", "mistral", "qwen2"]
PROMPTS = ["When Mary and John went to the store, John gave", "The cat sat", "one two three four five six seven"]


def capture(locations, n_layers):
    """A HookSet recording the tensor at every (location, layer) asked for."""
    seen: dict[tuple[str, int | None], torch.Tensor] = {}
    hooks = HookSet()
    for loc in locations:
        for layer in [None] if loc in GLOBAL_LOCATIONS else range(n_layers):
            hooks.add(loc, layer, lambda x, key=(loc, layer): seen.__setitem__(key, x.detach().clone()))
    return hooks, seen


def ids_of(loaded, text):
    return torch.tensor([loaded.encode(text)])


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_hidden_states_match_transformers(arch, make_checkpoint, tiny_model):
    folder = make_checkpoint(arch)
    ours, ref = tiny_model(arch), load_hf(folder)
    ids = ids_of(ours, PROMPTS[0])  # longer than mistral's window of 4
    hooks, seen = capture(["resid.pre", "resid.post"], ours.config.n_layers)
    with torch.no_grad():
        logits = ours.model(ids, hooks=hooks)
        out = ref(ids, output_hidden_states=True)
    assert logits.shape == out.logits.shape
    assert (logits - out.logits).abs().max() < 1e-4
    n = ours.config.n_layers
    for layer in range(n):
        torch.testing.assert_close(seen[("resid.pre", layer)], out.hidden_states[layer], atol=1e-4, rtol=0)
    # transformers' last hidden state is after the final norm
    final = ours.model.ln_f(seen[("resid.post", n - 1)], HookSet(), "ln_f.scale", None)
    torch.testing.assert_close(final, out.hidden_states[n], atol=1e-4, rtol=0)
    if ours.config.rope_scaling.get("rope_type", "default") != "default":  # the scaling mattered
        ours.config.rope_scaling = {}
        with torch.no_grad():
            assert (ours.model(ids) - out.logits).abs().max() > 1e-3


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (batch, token) for token-id rows of different lengths."""
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_batch_equals_prompts_one_by_one(arch, tiny_model):
    loaded = tiny_model(arch)
    rows = [loaded.encode(p) for p in PROMPTS]
    ids, mask = right_padded(rows)
    assert not mask.all()
    with torch.no_grad():
        batch = loaded.model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            single = loaded.model(torch.tensor([r]))
            torch.testing.assert_close(batch[i, : len(r)], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logit_positions_unembed_only_those_tokens(arch, tiny_model):
    loaded = tiny_model(arch)
    rows = [loaded.encode(p) for p in PROMPTS[:2]]
    ids, mask = right_padded(rows)
    last = mask.sum(1) - 1
    with torch.no_grad():
        full = loaded.model(ids, attention_mask=mask)
        picked = loaded.model(ids, attention_mask=mask, logit_positions=last)
    assert picked.shape == (len(rows), 1, full.shape[-1])
    torch.testing.assert_close(picked[:, 0], full[torch.arange(len(rows)), last], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "mistral"])
def test_sdpa_equals_eager_with_padding(arch, tiny_model):
    loaded = tiny_model(arch)
    ids = torch.tensor([loaded.encode(PROMPTS[0]), loaded.encode(PROMPTS[0])])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False
    logits = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            logits[impl] = loaded.model(ids, attention_mask=mask, attn_impl=impl)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=0)


def test_auto_attention_goes_eager_only_where_probabilities_are_hooked(tiny_model, monkeypatch):
    loaded = tiny_model("llama")
    model = loaded.model
    eager_layers = []
    for block in model.blocks:
        original = block.attn._eager

        def spy(q, k, v, ctx, layer, original=original):
            eager_layers.append(layer)
            return original(q, k, v, ctx, layer)

        monkeypatch.setattr(block.attn, "_eager", spy)
    ids = ids_of(loaded, PROMPTS[2])
    with torch.no_grad():
        plain = model(ids)
        assert eager_layers == []
        hooks, seen = HookSet(), {}
        hooks.add("attn.probs", 1, lambda p: seen.setdefault("probs", p))
        hooked = model(ids, hooks=hooks)
    assert eager_layers == [1]
    torch.testing.assert_close(plain, hooked, atol=1e-5, rtol=0)
    probs = seen["probs"]
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert probs.triu(diagonal=1).abs().max() == 0  # causal


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_every_location_is_hooked_with_its_named_shape(arch, tiny_model):
    loaded = tiny_model(arch)
    c = loaded.config
    sizes = {"batch": 2, "token": 5, "d_model": c.d_model, "one": 1, "head": c.n_heads, "kv_head": c.n_kv_heads,
             "d_head": c.d_head, "key": 5, "d_mlp": c.d_mlp, "vocab": c.vocab_size}
    model_locations = loaded.model.locations()  # the norms of the other families are not called here
    assert {"ln1.scale", "ln2.scale", "ln_f.scale"} <= set(model_locations)
    assert not {"q_norm.scale", "ln1_post.scale"} & set(model_locations)
    hooks, seen = capture(model_locations, c.n_layers)
    with torch.no_grad():
        loaded.model(torch.randint(0, 100, (2, 5)), hooks=hooks)
    for loc in model_locations:
        for layer in [None] if loc in GLOBAL_LOCATIONS else range(c.n_layers):
            expected = tuple(sizes[d] for d in LOCATIONS[loc])
            assert tuple(seen[(loc, layer)].shape) == expected, (loc, layer)


def test_locations_compose_as_documented(tiny_model):
    """resid.mid = resid.pre + attn.out; attn.out = z·W_O + b_O; mlp.out = post·W_out + b_out;
    resid.post = resid.mid + mlp.out; logits = ln_f(resid) · W_U; resid.embed = W_E[ids] + W_pos."""
    loaded = tiny_model("gpt2")
    m = loaded.model
    ids = ids_of(loaded, PROMPTS[1])
    hooks, s = capture([loc for loc in LOCATIONS if not loc.startswith("sae.")], loaded.config.n_layers)
    with torch.no_grad():
        logits = m(ids, hooks=hooks)
    T = ids.shape[1]
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # noqa: E731
    close(s[("resid.embed", None)], m.W_E[ids] + m.W_pos[:T])
    for L in range(loaded.config.n_layers):
        close(s[("attn.out", L)], torch.einsum("bthd,hdm->btm", s[("attn.z", L)], m.W_O(L)) + m.b_O(L))
        close(s[("resid.mid", L)], s[("resid.pre", L)] + s[("attn.out", L)])
        close(s[("mlp.out", L)], s[("mlp.post", L)] @ m.W_out(L) + m.b_out(L))
        close(s[("resid.post", L)], s[("resid.mid", L)] + s[("mlp.out", L)])
        pre = s[("resid.mid", L)] - s[("resid.mid", L)].mean(-1, keepdim=True)
        ln2 = pre / s[("ln2.scale", L)] * m.blocks[L].ln2.weight + m.blocks[L].ln2.bias
        close(s[("mlp.pre", L)], ln2 @ m.W_in(L) + m.blocks[L].mlp.fc_in.bias)
        z = torch.einsum("bhtu,buhd->bthd", s[("attn.probs", L)], s[("attn.v", L)])
        close(s[("attn.z", L)], z)
    resid = s[("resid.post", loaded.config.n_layers - 1)]
    centred = resid - resid.mean(-1, keepdim=True)
    close(s[("ln_f.scale", None)], torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + loaded.config.norm_eps))
    normed = centred / s[("ln_f.scale", None)] * m.final_norm_weight + m.final_norm_bias
    close(logits, normed @ m.W_U)


def test_editing_a_neuron_matches_a_transformers_forward_hook(make_checkpoint, tiny_model):
    folder = make_checkpoint("gpt2")
    ours, ref = tiny_model("gpt2"), load_hf(folder)
    ids = ids_of(ours, PROMPTS[0])
    layer, neuron = 1, 7

    def zero(x):
        x = x.clone()
        x[..., neuron] = 0
        return x

    hooks = HookSet()
    hooks.add("mlp.post", layer, zero)
    handle = ref.transformer.h[layer].mlp.act.register_forward_hook(lambda mod, inp, out: zero(out))
    with torch.no_grad():
        edited, expected = ours.model(ids, hooks=hooks), ref(ids).logits
        plain = ours.model(ids)
    handle.remove()
    assert (edited - expected).abs().max() < 1e-4
    assert (edited - plain).abs().max() > 1e-3  # the edit mattered


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_detached_norm_scale_is_constant_in_backward(arch, tiny_model):
    loaded = tiny_model(arch)
    norm = loaded.model.blocks[0].ln1
    x = torch.randn(1, 3, loaded.config.d_model, requires_grad=True)
    r = torch.randn(1, 3, loaded.config.d_model)
    frozen = HookSet()
    frozen.add("ln1.scale", 0, lambda s: s.detach())
    grads = {}
    for name, hooks in (("frozen", frozen), ("live", HookSet())):
        scale = {}
        hooks.add("ln1.scale", 0, lambda s: scale.setdefault("s", s))
        (norm(x, hooks, "ln1.scale", 0) * r).sum().backward()
        grads[name], x.grad = x.grad, None
    g = r * norm.weight / scale["s"]  # d/dx of centre(x) / s * w with s constant
    if norm.bias is not None:
        g = g - g.mean(-1, keepdim=True)
    torch.testing.assert_close(grads["frozen"], g.detach(), atol=1e-5, rtol=1e-5)
    assert (grads["frozen"] - grads["live"]).abs().max() > 1e-4


def test_weights_never_take_gradients(tiny_model):
    loaded = tiny_model("llama")
    assert all(not p.requires_grad for p in loaded.model.parameters())
    emb = {}
    hooks = HookSet()
    hooks.add("resid.embed", None, lambda x: emb.setdefault("x", x.requires_grad_()))
    loaded.model(ids_of(loaded, PROMPTS[1]), hooks=hooks)[0, -1].sum().backward()
    assert emb["x"].grad is not None
    assert all(p.grad is None for p in loaded.model.parameters())


def test_tied_embeddings_share_one_tensor(tiny_model):
    qwen, llama = tiny_model("qwen2"), tiny_model("llama")
    assert qwen.model.W_U.data_ptr() == qwen.model.W_E.data_ptr()
    assert llama.model.W_U.data_ptr() != llama.model.W_E.data_ptr()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("blocks.5.mlp.hook_post", ("mlp.post", 5)),
        ("blocks.5.mlp.hook_pre", ("mlp.pre", 5)),
        ("blocks.3.attn.hook_pattern", ("attn.probs", 3)),
        ("blocks.3.attn.hook_attn_scores", ("attn.logits", 3)),
        ("blocks.0.attn.hook_z", ("attn.z", 0)),
        ("blocks.1.attn.hook_rot_k", ("attn.k", 1)),
        ("blocks.2.hook_resid_post", ("resid.post", 2)),
        ("blocks.2.hook_resid_mid", ("resid.mid", 2)),
        ("blocks.2.hook_resid_pre", ("resid.pre", 2)),
        ("blocks.4.hook_attn_out", ("attn.out", 4)),
        ("blocks.4.hook_mlp_out", ("mlp.out", 4)),
        ("blocks.4.ln2.hook_scale", ("ln2.scale", 4)),
        ("hook_embed", ("resid.embed", None)),
        ("hook_pos_embed", ("resid.embed", None)),
        ("ln_final.hook_scale", ("ln_f.scale", None)),
        ("blocks.7.mlp.post", ("mlp.post", 7)),
        ("logits", ("logits", None)),
    ],
)
def test_hook_alias_maps_transformerlens_names(name, expected):
    assert hook_alias(name) == expected


def test_hook_alias_rejects_unknown_names_with_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'blocks.4.mlp.hook_post'"):
        hook_alias("blocks.4.mlp.hook_pst")
    with pytest.raises(ValueError):
        hook_alias("blocks.x.mlp.hook_post")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_mode_jvp_works_and_matches_finite_differences(arch, tiny_model):
    import torch.autograd.forward_ad as fwAD

    loaded = tiny_model(arch)
    model = loaded.model.double()
    ids = ids_of(loaded, PROMPTS[1])
    with torch.no_grad():
        hooks, seen = capture(["resid.embed"], 0)
        model(ids, hooks=hooks)
    x0 = seen[("resid.embed", None)]
    tangent = torch.randn_like(x0)

    def run_from(x):
        hooks = HookSet()
        hooks.add("resid.embed", None, lambda _: x)
        return model(ids, hooks=hooks)

    with fwAD.dual_level():  # attn_impl "auto": the fused kernel has no JVP, so it falls back to eager
        jvp = fwAD.unpack_dual(run_from(fwAD.make_dual(x0, tangent))).tangent
    eps = 1e-6
    with torch.no_grad():
        finite = (run_from(x0 + eps * tangent) - run_from(x0 - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(jvp, finite, atol=1e-5, rtol=1e-5)


def test_prompt_longer_than_learned_positions_is_a_clean_error(tiny_model):
    from tdbql.query.errors import TdbqlError

    loaded = tiny_model("gpt2")
    with pytest.raises(TdbqlError, match="exceed the model's context of 64"):
        loaded.model(torch.zeros(1, 65, dtype=torch.long))
