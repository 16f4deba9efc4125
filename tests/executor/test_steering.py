"""Steering and generation against hand-written transformers forwards with hooks.

A steer adds a vector to an activation; the reference adds the same vector with a module hook
(the block's input for resid.pre, the attention output for resid.mid, the MLP's output for
mlp[L], the block's output for resid[L]). Generation is compared with transformers' own greedy
`generate`, and, under interventions, with a hand-written loop that reruns the whole sequence
through the hooked transformers model each step (no cache), so the KV cache is checked too.
"""

from __future__ import annotations

import pytest
import torch

from tdbql.executor.runtime.batching import pad
from tdbql.executor.runtime.hooks import HookSet
from tdbql.executor.runtime.model import KVCache
from tdbql.query.context import PromptRow
from tdbql.query.errors import TdbqlError
from tests.executor.test_patching import CLEAN, CORRUPT, LONGER, SITES, Reference, metric, session_for

BLOCKS = {"gpt2": lambda m: m.transformer.h, "neox": lambda m: m.gpt_neox.layers, "llama": lambda m: m.model.layers}
MLPS = {"gpt2": lambda b: b.mlp, "neox": lambda b: b.mlp, "llama": lambda b: b.mlp}


class Steered(Reference):
    """The transformers reference with adding hooks."""

    def add(self, site: str, layer: int, vector: torch.Tensor, position: int | None):
        block = BLOCKS[self.arch](self.hf)[layer]

        def plus(x):
            x = x.clone()
            if position is None:
                x[0] += vector
            else:
                x[0, position % x.shape[1]] += vector
            return x

        if site == "resid.pre":
            return self._hook("resid.pre", layer, plus)
        if site == "resid.mid":
            return SITES[self.arch]["attn"](block).register_forward_hook(
                lambda module, args, out: (plus(out[0]), *out[1:]))
        if site == "mlp":
            return MLPS[self.arch](block).register_forward_hook(lambda module, args, out: plus(out))
        return block.register_forward_hook(  # resid[L]: the block's output
            lambda module, args, out: plus(out) if isinstance(out, torch.Tensor) else (plus(out[0]), *out[1:]))

    def logits(self, ids: list[int], hooks=()) -> torch.Tensor:
        handles = [self.add(*h) for h in hooks]
        try:
            with torch.no_grad():
                return self.hf(torch.tensor([ids])).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()

    def unembed(self, token: str) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight[self.encode(token)[0]].detach()


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_steers_equal_a_hand_hooked_transformers_forward(make_checkpoint, arch):
    folder = make_checkpoint(arch)
    session = session_for(folder)
    ref = Steered(folder, arch, session.loaded.encode)
    mary = ref.unembed(" Mary")
    ids = session.loaded.encode(CLEAN)
    cases = [("resid.pre[1]@-1", "resid.pre", 1, -1), ("resid.pre[0]", "resid.pre", 0, None),
             ("resid[1]@-2", "resid", 1, -2), ("mlp[0]", "mlp", 0, None)]
    if SITES[arch]["attn"] is not None:
        cases.append(("resid.mid[1]@-1", "resid.mid", 1, -1))
    for node, site, layer, position in cases:
        got = metric(session, f'metric steer {node} += 0.7 * unembed(" Mary")')["metric"]
        logits = ref.logits(ids, [(site, layer, 0.7 * mary, position)])
        assert got == pytest.approx(float(logits[ref.mary] - logits[ref.john]), abs=1e-4), node
    session.close()


def test_mean_and_latent_directions(make_checkpoint, tmp_path):
    from tdbql.executor.runtime.autoencoder import Autoencoder, save_saelens

    folder = make_checkpoint("gpt2")
    session = session_for(folder, ((CLEAN, CORRUPT), (CORRUPT, CLEAN)))
    ref = Steered(folder, "gpt2", session.loaded.encode)
    d_mlp = session.loaded.config.d_mlp
    torch.manual_seed(1)
    ae = Autoencoder(torch.randn(d_mlp, 5) * 0.3, torch.zeros(5), torch.randn(5, d_mlp) * 0.3, torch.zeros(d_mlp),
                     site="mlp", layer=1)
    save_saelens(ae, tmp_path / "sae")
    session.execute(f"sae mlp from '{tmp_path / 'sae'}'")
    block = ref.hf.transformer.h[1]
    latent = ae.W_dec[3] @ block.mlp.c_proj.weight  # the decoder row in the residual basis (Conv1D: (d_mlp, d))
    means = {}
    for name, texts in (("clean", (CLEAN, CORRUPT)), ("corrupt", (CORRUPT, CLEAN))):
        rows = [ref.run(t, capture=[("resid.pre", 1, None)])[1][("resid.pre", 1, None)][0, -1] for t in texts]
        means[name] = torch.stack(rows).mean(0)
    direction = 2.0 * (latent + means["clean"] - means["corrupt"])
    table = session.execute('metric steer resid.pre[1]@-1 += 2 * (latent(mlp_L1, 3) + mean(clean) - mean(corrupt))')
    for row, text in zip(table[0].table.to_pylist(), (CLEAN, CORRUPT)):
        logits = ref.logits(session.loaded.encode(text), [("resid.pre", 1, direction, -1)])
        assert row["metric"] == pytest.approx(float(logits[ref.mary] - logits[ref.john]), abs=1e-3)
    session.close()


def test_the_kv_cache_equals_the_full_forward(tiny_model):
    for arch in ("gpt2", "neox", "llama", "mistral"):  # learned, partial rotary, GQA + llama3 rope, a window
        loaded = tiny_model(arch)
        ids = loaded.encode(CLEAN)
        with torch.no_grad():
            full = loaded.model(torch.tensor([ids]))[0]
            cache = KVCache()
            steps = [loaded.model(torch.tensor([ids[:5]]), cache=cache)[0]]
            for token in ids[5:]:
                steps.append(loaded.model(torch.tensor([[token]]), cache=cache)[0])
        torch.testing.assert_close(torch.cat(steps), full, atol=1e-4, rtol=1e-4)
        assert cache.length == len(ids)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_greedy_generate_equals_transformers_generate(make_checkpoint, arch):
    folder = make_checkpoint(arch)
    session = session_for(folder)
    ref = Steered(folder, arch, session.loaded.encode)
    table = session.execute("generate 12")[0].table.to_pylist()
    ids = torch.tensor([session.loaded.encode(CLEAN)])
    assert [r["token_id"] for r in table] == hf_greedy(ref.hf, ids, 12)
    assert [r["step"] for r in table] == list(range(12))
    session.close()


def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    """transformers' greedy generate of exactly n tokens (no stop at end-of-text, as tdbql; its
    `min_new_tokens` would instead forbid that token, changing the output)."""
    hf.generation_config.eos_token_id = None
    hf.config.eos_token_id = None
    return hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()


def _hand_loop(ref: Steered, ids: list[int], n: int, hooks=(), zero=(), writes=()) -> list[int]:
    """Greedy decoding rerunning the whole sequence through the hooked transformers model."""
    out = list(ids)
    for _ in range(n):
        handles = [ref.add(*h) for h in hooks]
        try:
            with torch.no_grad():
                for site, layer, unit, t in zero:
                    handles.append(ref._hook(site, layer, _zero(ref, site, unit, t), writing=True))
                for site, layer, unit, positions, values in writes:
                    handles.append(ref._hook(site, layer, _write(ref, site, unit, positions, values), writing=True))
                logits = ref.hf(torch.tensor([out])).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        out.append(int(torch.argmax(logits)))
    return out[len(ids):]


def _zero(ref, site, unit, t):
    def fn(x):
        x = x.clone()
        view = ref._view(x, site, unit)
        if t is None:
            view[0] = 0
        else:
            view[0, t] = 0
        return x
    return fn


def _write(ref, site, unit, positions, values):
    def fn(x):
        x = x.clone()
        view = ref._view(x, site, unit)
        for t, value in zip(positions, values):
            view[0, t] = value
        return x
    return fn


def test_generate_under_ablation_patch_and_steer_equals_a_hand_loop(make_checkpoint):
    folder = make_checkpoint("gpt2")
    session = session_for(folder, ((CLEAN, LONGER),))
    ref = Steered(folder, "gpt2", session.loaded.encode)
    n, clean_ids, longer_ids = 10, session.loaded.encode(CLEAN), session.loaded.encode(LONGER)

    ablated = session.execute("generate 10 ablate attn[1,2]=0, mlp[0,7]=0")[0].table.column("token_id").to_pylist()
    assert ablated == _hand_loop(ref, clean_ids, n, zero=[("z", 1, 2, None), ("neuron", 0, 7, None)])

    steer = 1.5 * ref.unembed(" John")
    steered = session.execute('generate 10 steer resid.pre[1] += 1.5 * unembed(" John"), '
                              'resid[0]@-1 += 1.5 * unembed(" John")')[0].table.column("token_id").to_pylist()
    assert steered == _hand_loop(ref, clean_ids, n, hooks=[("resid.pre", 1, steer, None)] + [
        ("resid", 0, steer, len(clean_ids) - 1)])

    # patch from clean: the longer corrupt prompt runs; its last len(clean) positions take the clean heads
    _, kept = ref.run(CLEAN, capture=[("z", 1, 3)])
    source = ref._view(kept[("z", 1, 3)], "z", 3)[0]
    shift = len(longer_ids) - len(clean_ids)
    positions = list(range(shift, len(longer_ids)))
    patched = session.execute("generate 10 patch attn[1,3] from clean")[0].table.column("token_id").to_pylist()
    assert patched == _hand_loop(ref, longer_ids, n, writes=[("z", 1, 3, positions, [source[t - shift] for t in positions])])
    session.close()


def test_sampling_with_a_seed_is_reproducible(make_checkpoint):
    session = session_for(make_checkpoint("llama"))
    first = session.execute("generate 15 temperature 1.5 seed 11")[0].table.column("token_id").to_pylist()
    again = session.execute("generate 15 temperature 1.5 seed 11")[0].table.column("token_id").to_pylist()
    other = session.execute("generate 15 temperature 1.5 seed 12")[0].table.column("token_id").to_pylist()
    assert first == again and first != other
    session.close()


def test_logprobs_are_the_models(make_checkpoint):
    session = session_for(make_checkpoint("gpt2"))
    rows = session.execute("generate 3")[0].table.to_pylist()
    ids = session.loaded.encode(CLEAN)
    for row in rows:
        with torch.no_grad():
            logits = session.loaded.model(torch.tensor([ids]))[0, -1]
        assert row["logprob"] == pytest.approx(float(torch.log_softmax(logits, -1)[row["token_id"]]), abs=1e-5)
        ids.append(row["token_id"])
    session.close()


def test_steering_and_generation_errors(make_checkpoint):
    session = session_for(make_checkpoint("gpt2"))
    n_ctx = session.loaded.config.n_ctx
    cases = [
        ('metric steer attn[1,2] += unembed(" Mary")', "steer adds a direction to a residual-width activation"),
        ('metric steer resid[1] += unembed(" Maryanne")', r"unembed token ' Maryanne' is \d+ tokens"),
        ("metric steer resid[1] += latent(mlp_L1, 3)", "no mlp autoencoder is loaded at layer 1"),
        ("metric steer resid[1] += latent(foo, 3)", "names an autoencoder like mlp_L1"),
        ("generate 0", "generate must be at least 1"),
        (f"generate {n_ctx - 2}", "beyond the model's context"),
        ('metric steer resid[1]@40 += unembed(" Mary")', "outside prompt"),
        ("generate 3 temperature 500", "temperature must be between 0"),
    ]
    for text, message in cases:
        with pytest.raises(TdbqlError, match=message):
            session.execute(text)
    session.execute(f'prompt "{CLEAN}"')
    with pytest.raises(TdbqlError, match="mean.corrupt. averages the corrupted prompts"):
        session.execute("metric steer resid[1] += mean(corrupt)")
    assert session.execute("generate 2")[0].table.num_rows == 2  # the session is intact
    session.close()


def test_steering_composes_with_node_queries(make_checkpoint):
    """A steer changes what a node query sees: the residual it adds to feeds every later node."""
    session = session_for(make_checkpoint("gpt2"))
    plain = session.execute("select act of mlp where layer = 1 and token = -1")[0].table.column("act").to_pylist()
    steered = session.execute('select act of mlp where layer = 1 and token = -1 steer resid.pre[1]@-1 += '
                              '3 * unembed(" Mary")')[0].table.column("act").to_pylist()
    assert len(plain) == len(steered) and plain != pytest.approx(steered, abs=1e-3)
    loaded = session.loaded
    ids = loaded.encode(CLEAN)
    vector = 3 * loaded.model.W_U[:, loaded.encode(" Mary")[0]]
    hooks = HookSet()
    kept = {}
    hooks.add("resid.pre", 1, lambda x: torch.cat([x[:, :-1], x[:, -1:] + vector], dim=1))
    hooks.add("mlp.post", 1, lambda x: kept.setdefault("post", x))
    batch = pad([PromptRow(prompt_id=0, text=CLEAN)], [ids], 0, loaded.device)
    with torch.no_grad():
        loaded.model(batch.input_ids, None, hooks)
    assert steered == pytest.approx(kept["post"][0, -1].tolist(), abs=1e-5)
    session.close()


def test_steers_and_generation_on_the_embedded_model():
    from tdbql.executor.runtime.loading import DEFAULT_MODEL_DIR

    session = session_for("default")
    ref = Steered(DEFAULT_MODEL_DIR, "gpt2", session.loaded.encode)
    ids = session.loaded.encode(CLEAN)
    john = ref.unembed(" John")
    for node, site, layer, position in [("resid.pre[3]@-1", "resid.pre", 3, -1), ("mlp[2]", "mlp", 2, None)]:
        got = metric(session, f'metric steer {node} += 0.5 * unembed(" John")')["metric"]
        logits = ref.logits(ids, [(site, layer, 0.5 * john, position)])
        assert got == pytest.approx(float(logits[ref.mary] - logits[ref.john]), abs=2e-3), node  # spliced SAEs
    generated = session.execute("generate 8")[0].table.column("token_id").to_pylist()
    assert generated == hf_greedy(ref.hf, torch.tensor([ids]), 8)
    session.close()
