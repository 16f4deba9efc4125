"""Logit lens against transformers' hidden states; upvoted tokens against hand-written projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tdbql.executor import lens
from tdbql.executor.runtime.hooks import HookSet
from tdbql.query.context import PromptRow
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import Condition, LogitLensQuery, NodeRef, Range, UpvotedQuery

from tests.executor.conftest import load_hf
from tests.executor.engine_helpers import bound

PROMPTS = [
    PromptRow(prompt_id=0, text="When Mary and John went to the store, John gave"),
    PromptRow(prompt_id=5, text="A B C D A B"),
]


def where(**conds) -> tuple[Condition, ...]:
    out = []
    for field, (op, value) in conds.items():
        out.append(Condition(field=field, op=op, value=value))
    return tuple(out)


def hf_lens(folder, text, tokenizer_ids, use_ln_f: bool) -> list[torch.Tensor]:
    """Lens logits of transformers' hidden_states[l] (= resid.pre[l]) for l = 0..L-1, [T, V] each."""
    hf = load_hf(folder)
    with torch.no_grad():
        out = hf(torch.tensor([tokenizer_ids]), output_hidden_states=True)
    ln = hf.transformer.ln_f
    states = out.hidden_states[:-1]
    return [
        (F.layer_norm(h[0], ln.normalized_shape, ln.weight, ln.bias, ln.eps) if use_ln_f else h[0]) @ hf.lm_head.weight.T
        for h in states
    ]


def ranks(logits: torch.Tensor, ids: list[int]) -> list[int]:
    return [int((logits > logits[i]).sum()) + 1 for i in ids]


@pytest.mark.parametrize("use_ln_f", [True, False])
def test_lens_at_resid_pre_matches_transformers_hidden_states(make_checkpoint, tiny_model, use_ln_f):
    folder = make_checkpoint("gpt2")
    loaded = tiny_model("gpt2")
    query = LogitLensQuery(k=4, use_ln_f=use_ln_f, at="resid.pre")
    rows = lens.logit_lens(loaded, query, PROMPTS).to_pylist()
    for prompt in PROMPTS:
        ids = loaded.encode(prompt.text)
        want = hf_lens(folder, prompt.text, ids, use_ln_f)
        for layer, logits in enumerate(want):
            for t in range(len(ids)):
                got = [r for r in rows if (r["prompt_id"], r["layer"], r["position"]) == (prompt.prompt_id, layer, t)]
                top = logits[t].topk(4)
                assert [r["vocab_id"] for r in got] == top.indices.tolist()
                assert [r["logit"] for r in got] == pytest.approx(top.values.tolist(), abs=1e-4)
                assert [r["prob"] for r in got] == pytest.approx(logits[t].softmax(-1)[top.indices].tolist(), abs=1e-5)
                assert [r["rank"] for r in got] == [1, 2, 3, 4]
                if layer == 0:
                    assert all(r["rank_change"] is None for r in got)


def capture(loaded, text, locations):
    saved = {}
    hooks = HookSet()
    for loc, layer in locations:
        hooks.add(loc, layer, lambda x, key=(loc, layer): saved.__setitem__(key, x[0].detach()))
    with torch.no_grad():
        loaded.model(torch.tensor([loaded.encode(text)]), hooks=hooks)
    return saved


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lens_rank_change_against_the_previous_state(tiny_model, arch):
    loaded = tiny_model(arch)
    query = LogitLensQuery(k=5, at="resid.post", where=where(token=("=", -1), layer=("=", 1)))
    rows = lens.logit_lens(loaded, query, PROMPTS[:1]).to_pylist()
    saved = capture(loaded, PROMPTS[0].text, [("resid.post", 1), ("resid.mid", 1)])
    m = loaded.model
    final = lambda x: m.ln_f(x, HookSet(), "ln_f.scale", None) @ m.W_U  # noqa: E731
    now, before = final(saved[("resid.post", 1)][-1]), final(saved[("resid.mid", 1)][-1])
    ids = [r["vocab_id"] for r in rows]
    assert len(rows) == 5 and {r["layer"] for r in rows} == {1}
    assert {r["position"] for r in rows} == {len(loaded.encode(PROMPTS[0].text)) - 1}
    assert ids == now.topk(5).indices.tolist()
    assert [r["rank_change"] for r in rows] == [b - a for a, b in zip(ranks(now, ids), ranks(before, ids))]
    if arch == "gpt2":  # resid.post of the last layer through ln_f is the model's own output
        with torch.no_grad():
            logits = m(torch.tensor([loaded.encode(PROMPTS[0].text)]))[0, -1]
        assert [r["logit"] for r in rows] == pytest.approx(logits[ids].tolist(), abs=1e-4)


def test_lens_where_filters(tiny_model):
    loaded = tiny_model("gpt2")
    query = LogitLensQuery(k=2, at="resid.mid", where=where(token=("in", Range(lo=-3, hi=-2)), prompt=("=", 5)))
    rows = lens.logit_lens(loaded, query, PROMPTS).to_pylist()
    n = len(loaded.encode(PROMPTS[1].text))
    assert {(r["prompt_id"], r["position"]) for r in rows} == {(5, n - 3), (5, n - 2)}
    assert {r["layer"] for r in rows} == {0, 1} and len(rows) == 2 * 2 * 2


# --- upvoted tokens ---------------------------------------------------------------------------------


def scores_of(loaded, write: torch.Tensor) -> torch.Tensor:
    """TDB's scored tokens: write @ (W_U * gamma_f), minus the vocab mean."""
    m = loaded.model
    s = write @ (m.W_U * m.final_norm_weight[:, None])
    return s - s.mean()


def all_scores(loaded, node: NodeRef, prompts, raw=False) -> dict[tuple, torch.Tensor]:
    """Every token's score per (prompt, position), via k = vocab."""
    vocab = loaded.info().vocab_size
    rows = lens.upvoted(loaded, UpvotedQuery(node=node, k=vocab, raw=raw), prompts).to_pylist()
    out: dict[tuple, torch.Tensor] = {}
    for r in rows:
        out.setdefault((r["prompt_id"], r["position"]), torch.zeros(vocab, dtype=torch.float64))[r["vocab_id"]] = r["score"]
    return out


def test_neuron_upvoted_scaled_and_raw(tiny_model):
    loaded = tiny_model("gpt2")
    node = NodeRef(component="mlp", layer=1, index=7, token=-1)
    rows = lens.upvoted(loaded, UpvotedQuery(node=node, k=3), PROMPTS[:1]).to_pylist()
    post = capture(loaded, PROMPTS[0].text, [("mlp.post", 1)])[("mlp.post", 1)]
    want = scores_of(loaded, post[-1, 7] * loaded.model.W_out(1)[7])
    top = want.topk(3)
    assert [r["vocab_id"] for r in rows] == top.indices.tolist()
    assert [r["score"] for r in rows] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert [r["rank"] for r in rows] == [1, 2, 3]

    raw = lens.upvoted(loaded, UpvotedQuery(node=node, k=3, raw=True, bottom=True), PROMPTS).to_pylist()
    low = scores_of(loaded, loaded.model.W_out(1)[7]).topk(3, largest=False)
    assert [r["vocab_id"] for r in raw] == low.indices.tolist()
    assert [r["score"] for r in raw] == pytest.approx(low.values.tolist(), abs=1e-5)
    assert all(r["prompt_id"] is None and r["position"] is None for r in raw)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_head_and_block_writes_add_up(tiny_model, arch):
    """Scores are linear in the write: keys sum to the head, heads (+ b_O) to attn[L],
    attn[L] + mlp[L] to block[L]; each checked against a hand-built write."""
    loaded = tiny_model(arch)
    prompt, layer, t = PROMPTS[1:], 1, 4
    heads = [all_scores(loaded, NodeRef(component="attn", layer=layer, index=h, token=t), prompt)[(5, t)] for h in range(4)]
    keys = [all_scores(loaded, NodeRef(component="attn", layer=layer, index=2, token=t, key=u), prompt)[(5, t)] for u in range(t + 1)]
    torch.testing.assert_close(sum(keys), heads[2], atol=1e-5, rtol=0)

    attn = all_scores(loaded, NodeRef(component="attn", layer=layer, token=t), prompt)[(5, t)]
    b_O = loaded.model.b_O(layer)
    bias = scores_of(loaded, b_O).double() if b_O is not None else 0
    torch.testing.assert_close(sum(heads) + bias, attn, atol=1e-5, rtol=0)

    mlp = all_scores(loaded, NodeRef(component="mlp", layer=layer, token=t), prompt)[(5, t)]
    block = all_scores(loaded, NodeRef(component="block", layer=layer), prompt)[(5, t)]
    torch.testing.assert_close(attn + mlp, block, atol=1e-4, rtol=0)

    saved = capture(loaded, PROMPTS[1].text, [("resid.pre", layer), ("resid.post", layer)])
    want = scores_of(loaded, saved[("resid.post", layer)][t] - saved[("resid.pre", layer)][t]).double()
    torch.testing.assert_close(block, want, atol=1e-4, rtol=0)


def test_upvoted_errors(tiny_model):
    loaded = tiny_model("gpt2")
    cases = [
        (NodeRef(component="mlp", layer=5, index=0), "layer 5"),
        (NodeRef(component="mlp", layer=0, index=999), "out of range"),
        (NodeRef(component="resid", layer=0), "logit_lens"),
        (NodeRef(component="attn", layer=0, index=1, token=2, key=4), "after query"),
        (NodeRef(component="mlp_sae", layer=0, index=1), "autoencoder"),
    ]
    for node, message in cases:  # the binder refuses them before any forward pass
        with pytest.raises(TdbqlError, match=message):
            bound(loaded, UpvotedQuery(node=node))
    with pytest.raises(TdbqlError, match="raw"):
        bound(loaded, UpvotedQuery(node=NodeRef(component="attn", layer=0, index=1, token=2), raw=True))


def test_mlp_latent_upvoted_uses_the_decoder_row_in_the_residual_basis(tiny_model):
    from tdbql.executor.runtime.autoencoder import Autoencoder

    loaded = tiny_model("gpt2")
    g = torch.Generator().manual_seed(3)
    d_mlp, n_latents = loaded.info().d_mlp, 24
    ae = Autoencoder(
        torch.randn(d_mlp, n_latents, generator=g), torch.zeros(n_latents),
        torch.randn(n_latents, d_mlp, generator=g) / 5, torch.zeros(d_mlp), site="mlp", layer=1,
    )
    loaded.attach_sae("mlp", 1, ae)
    node = NodeRef(component="mlp_sae", layer=1, index=5, token=-1)
    latents = capture(loaded, PROMPTS[0].text, [("sae.mlp.latent", 1)])[("sae.mlp.latent", 1)]
    row = ae.W_dec[5] @ loaded.model.W_out(1)
    want = scores_of(loaded, latents[-1, 5] * row)
    got = all_scores(loaded, node, PROMPTS[:1])
    assert latents[-1, 5] != 0  # the test needs an active latent
    torch.testing.assert_close(next(iter(got.values())), want.double(), atol=1e-5, rtol=1e-6)
    raw = all_scores(loaded, node, PROMPTS[:1], raw=True)[(None, None)]
    torch.testing.assert_close(raw, scores_of(loaded, row).double(), atol=1e-5, rtol=1e-6)


def test_lens_runs_under_hooks_the_engine_adds(tiny_model):
    """With attention's write of layer 1 zeroed, resid.mid[1] equals resid.pre[1]: same lens rows."""
    loaded = tiny_model("gpt2")
    calls = []

    def zero_attention(hooks: HookSet, batch) -> None:
        calls.append(batch.prompt_ids.tolist())
        hooks.add("attn.out", 1, torch.zeros_like)

    cond = where(layer=("=", 1))
    mid = lens.logit_lens(loaded, LogitLensQuery(k=3, at="resid.mid", where=cond), PROMPTS, add_hooks=zero_attention)
    pre = lens.logit_lens(loaded, LogitLensQuery(k=3, at="resid.pre", where=cond), PROMPTS)
    assert calls == [[0, 5]]
    assert mid.column("vocab_id").to_pylist() == pre.column("vocab_id").to_pylist()
    assert mid.column("logit").to_pylist() == pytest.approx(pre.column("logit").to_pylist(), abs=1e-5)
    assert set(mid.column("rank_change").to_pylist()) == {0}  # resid.mid[1] vs resid.pre[1]: unchanged
