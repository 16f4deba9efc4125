"""Ablations (TDB semantics) against hand-written hooks: neurons (mlp.post[t,n]), heads
(attn.probs at query t, all keys), latents (error frozen); several at once; =mean."""

from __future__ import annotations

import pytest
import torch
from tdbql.executor.engine import Engine
from tdbql.executor.runtime.hooks import HookSet
from tdbql.query.plan import Ablation, Condition, LogitsQuery, NodeQuery, NodeRef, ScalarSpec

from tests.executor.engine_helpers import explain, run
from tests.executor.test_scalars import LOSS, Reference, engine_rows, prompts, random_sae

TEXTS = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the mat"]


def edit(index, value):
    """A hand-written ablation hook: clone, x[index] = value, return."""
    def hook(x):
        x = x.clone()
        x[index] = value(x) if callable(value) else value
        return x

    return hook


ALL = slice(None)


def manual(loaded, text, add):
    hooks = HookSet()
    add(hooks)
    captured = {}
    for layer in range(loaded.config.n_layers):
        hooks.add("mlp.post", layer, lambda x, layer=layer: captured.__setitem__(layer, x.detach()[0]))
    with torch.no_grad():
        logits = loaded.model(torch.tensor([loaded.encode(text)]), hooks=hooks)[0]
    return logits, captured


def check(loaded, ablations, add, texts=TEXTS):
    rows = prompts(texts)
    logit_table = run(Engine(loaded, batch_size=2), LogitsQuery(k=5, ablations=ablations), rows)["result"].to_pylist()
    acts = engine_rows(loaded, NodeQuery(mode="select", scalars=(ScalarSpec(name="act"),), components=("mlp",),
                                         ablations=ablations), rows)
    changed = False
    for row in rows:
        logits, post = manual(loaded, row.text, add)
        clean, _ = manual(loaded, row.text, lambda h: None)
        changed |= not torch.allclose(logits, clean, atol=1e-4)
        for r in (r for r in logit_table if r["prompt_id"] == row.prompt_id):
            assert abs(r["logit"] - float(logits[r["position"], r["vocab_id"]])) < 1e-4
        for layer, a in post.items():
            for t in range(a.shape[0]):
                for n in range(a.shape[1]):
                    assert abs(acts[(row.prompt_id, "mlp", layer, n, t, None)]["act"] - float(a[t, n])) < 1e-5
    assert changed  # the ablation did something


def test_neuron_ablation_at_one_token(tiny_model):
    loaded = tiny_model("gpt2")
    n = 4

    def add(hooks):
        hooks.add("mlp.post", 0, edit((ALL, -1, n), 0.0))

    check(loaded, (Ablation(node=NodeRef(component="mlp", layer=0, index=n, token=-1), value=0.0),), add)


def test_head_ablation_all_keys_and_neuron_at_all_tokens_together(tiny_model):
    loaded = tiny_model("gpt2")
    h, n = 1, 9

    def add(hooks):
        hooks.add("attn.probs", 0, edit((ALL, h, 2), 0.0))  # query token 2, all keys
        hooks.add("mlp.post", 0, edit((ALL, ALL, n), 0.5))

    ablations = (
        Ablation(node=NodeRef(component="attn", layer=0, index=h, token=2), value=0.0),
        Ablation(node=NodeRef(component="mlp", layer=0, index=n), value=0.5),
    )
    check(loaded, ablations, add)


@pytest.mark.parametrize("arch", ["llama"])
def test_head_ablation_llama(tiny_model, arch):
    loaded = tiny_model(arch)

    def add(hooks):
        hooks.add("attn.probs", 0, edit((ALL, 3, -1), 0.0))

    check(loaded, (Ablation(node=NodeRef(component="attn", layer=0, index=3, token=-1), value=0.0),), add)


def test_latent_ablation_keeps_the_error_frozen(tiny_model):
    loaded = tiny_model("gpt2")
    ae = random_sae("mlp", 0, loaded.config.d_mlp, 24, 1)
    loaded.attach_sae("mlp", 0, ae)
    text = TEXTS[0]
    # pick a latent that is active at the last token
    ref = Reference(loaded, text)
    i = int(ref.val("sae.mlp.latent", 0)[-1].argmax())
    z = float(ref.val("sae.mlp.latent", 0)[-1, i])
    assert z > 0

    def add(hooks):
        hooks.add("sae.mlp.latent", 0, edit((ALL, -1, i), 0.0))

    check(loaded, (Ablation(node=NodeRef(component="mlp_sae", layer=0, index=i, token=-1), value=0.0),), add)
    # TDB: the effect on the MLP output is exactly -z * D[i] (the reconstruction error is frozen)
    outs = []
    for hook in (None, add):
        hooks = HookSet()
        if hook:
            hook(hooks)
        hooks.add("mlp.out", 0, lambda x: outs.append(x.detach()[0, -1]))
        with torch.no_grad():
            loaded.model(torch.tensor([loaded.encode(text)]), hooks=hooks)
    want = -z * (ae.W_dec[i] @ loaded.model.W_out(0))
    assert torch.allclose(outs[1] - outs[0], want, atol=1e-5)


def test_mean_ablation_uses_the_prompt_set_mean(tiny_model):
    loaded = tiny_model("gpt2")
    n, h = 6, 2
    texts = TEXTS + ["one two three four five six"]
    means = {}
    for text in texts:  # hand-computed means over the prompt set (clean model)
        _, post = manual(loaded, text, lambda hk: None)
        means.setdefault("neuron", []).append(post[0][-1, n])
        probs = []
        hooks = HookSet()
        hooks.add("attn.probs", 1, lambda x: probs.append(x.detach()[0, h, -1]))
        with torch.no_grad():
            loaded.model(torch.tensor([loaded.encode(text)]), hooks=hooks)
        means.setdefault("head", []).append(probs[0])
    neuron_mean = float(torch.stack(means["neuron"]).mean())
    width = max(p.numel() for p in means["head"])
    head_mean = torch.stack([torch.nn.functional.pad(p, (0, width - p.numel())) for p in means["head"]]).mean(0)

    def add(hooks):
        hooks.add("mlp.post", 0, edit((ALL, -1, n), neuron_mean))
        hooks.add("attn.probs", 1, edit((ALL, h, -1), lambda x: head_mean[: x.shape[-1]]))

    ablations = (
        Ablation(node=NodeRef(component="mlp", layer=0, index=n, token=-1), value="mean"),
        Ablation(node=NodeRef(component="attn", layer=1, index=h, token=-1), value="mean"),
    )
    check(loaded, ablations, add, texts)
    text = explain(Engine(loaded), NodeQuery(mode="topk", k=3, scalars=(ScalarSpec(name="act"),),
                                            ablations=ablations), prompts(texts), LOSS)
    assert "=mean" in text and "whole prompt set" in text


def test_ablation_changes_gradients_like_a_hand_written_hook(tiny_model):
    loaded = tiny_model("gpt2")
    n = 4
    ablation = (Ablation(node=NodeRef(component="mlp", layer=0, index=n, token=-1), value=0.0),)
    rows = prompts(TEXTS)
    got = engine_rows(loaded, NodeQuery(mode="select", scalars=(ScalarSpec(name="act_times_grad"),),
                                        components=("mlp",), ablations=ablation,
                                        where=(Condition(field="layer", op="=", value=1),)), rows)
    for row in rows:
        ref = Reference(loaded, row.text, extra=lambda hk: hk.add("mlp.post", 0, edit((ALL, -1, n), 0.0)))
        a, da = ref.val("mlp.post", 1), ref.grad("mlp.post", 1)
        for t in range(ref.T):
            for j in range(a.shape[1]):
                assert abs(got[(row.prompt_id, "mlp", 1, j, t, None)]["act_times_grad"] - float(a[t, j] * da[t, j])) < 1e-5
