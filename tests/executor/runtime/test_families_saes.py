"""SAELens checkpoints as SAELens 6 and older versions write them, read without sae-lens: every
cfg.json field tdbql honours against hand-written formulas; transcoders and input-normalising
autoencoders spliced into the forward; their latents' scalars against plain autograd.

(tests/executor/runtime/test_saelens.py builds the same kinds with the sae-lens package itself.)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tdbql.executor.runtime.autoencoder import Autoencoder, load_autoencoder, save_saelens
from tdbql.executor.runtime.hooks import HookSet
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import Ablation, NodeQuery, NodeRef, ScalarSpec

from tests.executor.test_scalars import SCALARS, Reference, assert_matches, engine_rows, prompts, reference_table

D, N = 8, 12
G = torch.Generator().manual_seed(5)
W_ENC, B_ENC = torch.randn(D, N, generator=G), torch.randn(N, generator=G)
W_DEC, B_DEC = torch.randn(N, D, generator=G), torch.randn(D, generator=G)
THRESHOLD = torch.rand(N, generator=G)
X = torch.randn(3, D, generator=G)


def write(folder, cfg, **tensors):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"W_enc": W_ENC, "b_enc": B_ENC, "W_dec": W_DEC, "b_dec": B_DEC}
    save_file({**base, **tensors}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def saelens6(architecture="standard", hook="blocks.1.hook_resid_pre", **fields):
    """cfg.json exactly as sae-lens 6.54 writes it (save_model): the hook under `metadata`."""
    return {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "hook_name": hook},
            **fields, "architecture": architecture}


def test_saelens6_metadata_hook_name_gives_site_and_layer(tmp_path):
    """The issue's case: hook_name only under metadata (it used to be read as '')."""
    ae = load_autoencoder(write(tmp_path / "s", saelens6()))
    assert (ae.site, ae.layer, ae.activation, ae.n_latents) == ("resid", 0, "relu", N)
    torch.testing.assert_close(ae.encode(X), torch.relu((X - B_DEC) @ W_ENC + B_ENC))
    older = {"d_in": D, "d_sae": N, "architecture": "standard", "hook_name": "blocks.2.mlp.hook_post"}
    ae = load_autoencoder(write(tmp_path / "o", older))
    assert (ae.site, ae.layer) == ("mlp", 2)


def test_apply_b_dec_to_input_jumprelu_threshold_and_log_threshold(tmp_path):
    pre = X @ W_ENC + B_ENC
    ae = load_autoencoder(write(tmp_path / "j", saelens6("jumprelu", apply_b_dec_to_input=False), threshold=THRESHOLD))
    torch.testing.assert_close(ae.encode(X), torch.relu(pre) * (pre > THRESHOLD))
    ae = load_autoencoder(write(tmp_path / "l", saelens6("jumprelu", apply_b_dec_to_input=False),
                                log_threshold=THRESHOLD.log()))
    torch.testing.assert_close(ae.threshold, THRESHOLD)
    with pytest.raises(TdbqlError, match="needs a threshold"):
        load_autoencoder(write(tmp_path / "n", saelens6("jumprelu")))


@pytest.mark.parametrize("rescale", [False, True])
def test_topk_k_and_decoder_norm_rescaling(rescale, tmp_path):
    ae = load_autoencoder(write(tmp_path / "k", saelens6("topk", k=4, rescale_acts_by_decoder_norm=rescale)))
    norms = W_DEC.norm(dim=-1) if rescale else torch.ones(N)
    pre = ((X - B_DEC) @ W_ENC + B_ENC) * norms  # SAELens: topk of pre · ‖W_dec‖
    top = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(ae.encode(X), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.decode(z), (z / norms) @ W_DEC + B_DEC, atol=1e-5, rtol=1e-5)
    old = {"d_in": D, "d_sae": N, "architecture": "topk", "hook_name": "blocks.0.hook_attn_out",
           "activation_fn_kwargs": {"k": 3}}
    assert load_autoencoder(write(tmp_path / "kw", old)).k == 3


def test_input_normalisations(tmp_path):
    rescale = load_autoencoder(write(tmp_path / "r", saelens6(normalize_activations="constant_norm_rescale")))
    coeff = D ** 0.5 / X.norm(dim=-1, keepdim=True)
    z = torch.relu((X * coeff - B_DEC) @ W_ENC + B_ENC)
    torch.testing.assert_close(rescale.encode(X), z)
    torch.testing.assert_close(rescale(X), (z @ W_DEC + B_DEC) / coeff)
    ln = load_autoencoder(write(tmp_path / "n", saelens6(normalize_activations="layer_norm")))
    mu, std = X.mean(-1, keepdim=True), (X - X.mean(-1, keepdim=True)).std(-1, keepdim=True)
    z = torch.relu(((X - mu) / (std + 1e-5) - B_DEC) @ W_ENC + B_ENC)
    torch.testing.assert_close(ln.encode(X), z)
    torch.testing.assert_close(ln(X), (z @ W_DEC + B_DEC) * std + mu)
    for folded in ("expected_average_only_in", "covariance_whitening"):  # nothing to apply at inference
        ae = load_autoencoder(write(tmp_path / folded, saelens6(normalize_activations=folded)))
        torch.testing.assert_close(ae.encode(X), torch.relu((X - B_DEC) @ W_ENC + B_ENC))
    with pytest.raises(TdbqlError, match="normalisation 'whiten' is not supported"):
        load_autoencoder(write(tmp_path / "w", saelens6(normalize_activations="whiten")))


def test_transcoder_layouts(tmp_path):
    W_dec_out, b_out = torch.randn(N, 6, generator=G), torch.randn(6, generator=G)
    W_skip = torch.randn(6, D, generator=G)
    cfg = saelens6("skip_transcoder", hook="blocks.2.ln2.hook_normalized", apply_b_dec_to_input=False, d_out=6)
    cfg["metadata"]["hook_name_out"] = "blocks.2.hook_mlp_out"
    ae = load_autoencoder(write(tmp_path / "t", cfg, W_dec=W_dec_out, b_dec=b_out, W_skip=W_skip))
    assert (ae.site, ae.layer, ae.reads, ae.d_in, ae.d_out, ae.transcoder) == ("mlp_tc", 2, "mlp.in", D, 6, True)
    z = torch.relu(X @ W_ENC + B_ENC)
    torch.testing.assert_close(ae.encode(X), z)
    torch.testing.assert_close(ae(X), z @ W_dec_out + b_out + X @ W_skip.T)
    jump = {**cfg, "architecture": "jumprelu_transcoder"}
    ae = load_autoencoder(write(tmp_path / "jt", jump, W_dec=W_dec_out, b_dec=b_out, threshold=THRESHOLD))
    pre = X @ W_ENC + B_ENC
    torch.testing.assert_close(ae.encode(X), torch.relu(pre) * (pre > THRESHOLD))
    assert ae.W_skip is None
    wrong = {**cfg, "metadata": {**cfg["metadata"], "hook_name_out": "blocks.3.hook_mlp_out"}}
    with pytest.raises(TdbqlError, match="is not blocks.2.hook_mlp_out"):
        load_autoencoder(write(tmp_path / "w", wrong, W_dec=W_dec_out, b_dec=b_out, W_skip=W_skip))
    post = {**cfg, "metadata": {"hook_name": "blocks.2.mlp.hook_post"}}
    with pytest.raises(TdbqlError, match="is not the MLP's input"):
        load_autoencoder(write(tmp_path / "p", post, W_dec=W_dec_out, b_dec=b_out, W_skip=W_skip))
    with pytest.raises(TdbqlError, match="missing tensor"):
        load_autoencoder(write(tmp_path / "m", cfg, W_dec=W_dec_out, b_dec=b_out))


def test_refused_kinds_are_clear(tmp_path):
    for fields, message in [
        ({"architecture": "gated"}, "'gated' is not supported"),
        ({"reshape_activations": "hook_z"}, "hook_z"),
        ({"metadata": {"hook_name": "blocks.1.hook_resid_pre", "hook_head_index": 2}}, "hook_head_index"),
        ({"metadata": {"hook_name": 7}}, "cannot read the autoencoder"),
    ]:
        with pytest.raises(TdbqlError, match=message):
            load_autoencoder(write(tmp_path / str(len(message)), {**saelens6(), **fields}))


def random_transcoder(d, layer, n=10, seed=0, skip=True, activation="relu"):
    g = torch.Generator().manual_seed(seed)
    return Autoencoder(torch.randn(d, n, generator=g) * 0.3, 0.1 * torch.randn(n, generator=g),
                       torch.randn(n, d, generator=g) * 0.3, 0.1 * torch.randn(d, generator=g), site="mlp_tc",
                       layer=layer, subtract_b_dec=False, activation=activation,
                       threshold=0.05 * torch.rand(n, generator=g) if activation == "jumprelu" else None,
                       W_skip=0.1 * torch.randn(d, d, generator=g) if skip else None)


@pytest.mark.parametrize("flat", [False, True])
def test_save_and_load_round_trip_both_layouts(flat, tmp_path):
    for i, ae in enumerate([random_transcoder(D, 1), random_transcoder(D, 0, skip=False, activation="jumprelu"),
                            Autoencoder(W_ENC, B_ENC, W_DEC, B_DEC, site="attn", layer=3, activation="topk", k=5,
                                        normalize="layer_norm")]):
        back = load_autoencoder(save_saelens(ae, tmp_path / str(i), flat=flat))
        assert (back.site, back.layer, back.activation, back.k, back.normalize) == (
            ae.site, ae.layer, ae.activation, ae.k, ae.normalize)
        torch.testing.assert_close(back(X), ae(X))
        assert ("metadata" in json.loads((tmp_path / str(i) / "cfg.json").read_text())) != flat


# --- spliced into the forward ----------------------------------------------------------------------------


def _run(loaded, hooks=None):
    with torch.no_grad():
        return loaded.model(torch.tensor([loaded.encode("When Mary and John went to the store")]), hooks=hooks)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "olmo2"])
def test_transcoder_splice_keeps_the_forward_and_ablation_moves_mlp_out_by_the_decoder_row(arch, tiny_model):
    loaded = tiny_model(arch)
    d = loaded.config.d_model
    plain = _run(loaded)
    tc = random_transcoder(d, 1)
    loaded.attach_sae("mlp_tc", 1, tc)
    try:
        torch.testing.assert_close(_run(loaded), plain, atol=1e-5, rtol=0)
        seen: dict = {}
        hooks = HookSet()
        hooks.add("mlp.in", 1, lambda x: seen.__setitem__("in", x[0]))
        hooks.add("mlp.out", 1, lambda x: seen.__setitem__("out", x[0]))
        _run(loaded, hooks)
        z = tc.encode(seen["in"])
        t, i = 3, int(z[3].argmax())
        assert z[t, i] > 0
        edited = HookSet()
        edited.add("sae.mlp_tc.latent", 1, lambda x: x.index_fill(2, torch.tensor([i]), 0.0))
        edited.add("mlp.out", 1, lambda x: seen.__setitem__("edited", x[0]))
        _run(loaded, edited)
        want = seen["out"].clone()
        want[:, :] -= z[:, i, None] * tc.W_dec[i]
        torch.testing.assert_close(seen["edited"], want, atol=1e-5, rtol=0)
    finally:
        loaded.detach_saes()


def test_transcoders_and_normalising_saes_are_checked_at_attach(tiny_model):
    gpt2, olmo2 = tiny_model("gpt2"), tiny_model("olmo2")
    d = gpt2.config.d_model
    mid = random_transcoder(d, 0)
    mid.reads = "resid.mid"
    with pytest.raises(TdbqlError, match="reads the residual before the MLP's norm"):
        gpt2.attach_sae("mlp_tc", 0, mid)
    olmo2.attach_sae("mlp_tc", 0, mid)  # no pre-norms: the MLP's input is resid.mid
    olmo2.detach_saes()
    with pytest.raises(TdbqlError, match="transcoders go at mlp_tc"):
        gpt2.attach_sae("mlp", 0, random_transcoder(d, 0))
    wide = random_transcoder(d + 1, 0)
    with pytest.raises(TdbqlError, match=f"reads {d + 1} dims"):
        gpt2.attach_sae("mlp_tc", 0, wide)


def _normalising_sae(d, layer, normalize, seed=3):
    g = torch.Generator().manual_seed(seed)
    return Autoencoder(torch.randn(d, 16, generator=g) * 0.4, 0.1 * torch.randn(16, generator=g),
                       torch.randn(16, d, generator=g) * 0.3, 0.1 * torch.randn(d, generator=g),
                       site="resid", layer=layer, normalize=normalize)


@pytest.mark.parametrize("normalize", ["constant_norm_rescale", "layer_norm"])
def test_normalising_sae_splice_keeps_the_forward(normalize, tiny_model):
    loaded = tiny_model("llama")
    plain = _run(loaded)
    loaded.attach_sae("resid", 0, _normalising_sae(loaded.config.d_model, 0, normalize))
    try:
        torch.testing.assert_close(_run(loaded), plain, atol=1e-5, rtol=0)
    finally:
        loaded.detach_saes()


# --- scalars against plain autograd ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_transcoder_latents_and_errors_equal_plain_autograd(arch, tiny_model):
    loaded = tiny_model(arch)
    loaded.attach_sae("mlp_tc", 0, random_transcoder(loaded.config.d_model, 0, seed=1))
    loaded.attach_sae("mlp_tc", 1, random_transcoder(loaded.config.d_model, 1, seed=2, activation="jumprelu"))
    try:
        rows = prompts()
        scalars = (*SCALARS, "sae_error")
        query = NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in scalars), components=("mlp_tc",))
        got = engine_rows(loaded, query, rows)
        assert {k[1] for k in got} == {"mlp_tc", "mlp_tc_error"}
        assert_matches(got, reference_table(loaded, rows), scalars, ("mlp_tc", "mlp_tc_error"))
        assert any(r["act"] > 0 for k, r in got.items() if k[1] == "mlp_tc")
    finally:
        loaded.detach_saes()


def test_transcoder_latents_rank_with_the_other_nodes_and_ablate(tiny_model):
    loaded = tiny_model("gpt2")
    loaded.attach_sae("mlp_tc", 1, random_transcoder(loaded.config.d_model, 1, seed=4))
    try:
        rows = prompts()
        query = NodeQuery(mode="topk", k=30, scalars=(ScalarSpec(name="act_times_grad"),),
                          components=("mlp", "attn", "mlp_tc"))
        got = engine_rows(loaded, query, rows)
        assert {k[1] for k in got} >= {"mlp_tc"}
        ablated = NodeQuery(mode="select", scalars=(ScalarSpec(name="act"),), components=("mlp_tc",),
                            ablations=(Ablation(node=NodeRef(component="mlp_tc", layer=1, index=2), value=0.0),))
        rows_ablated = engine_rows(loaded, ablated, rows)
        assert all(r["act"] == 0 for k, r in rows_ablated.items() if k[3] == 2 and k[1] == "mlp_tc")
    finally:
        loaded.detach_saes()


@pytest.mark.parametrize("normalize", ["constant_norm_rescale", "layer_norm"])
def test_normalising_sae_latent_writes_are_divided_by_its_scale(normalize, tiny_model):
    """write_norm = z·‖D[i]‖ / c[t] and direct_effect = z·(D[i]·g[t]) / c[t], with c the
    autoencoder's output divisor at the token (its input normalisation)."""
    loaded = tiny_model("gpt2")
    ae = _normalising_sae(loaded.config.d_model, 0, normalize)
    loaded.attach_sae("resid", 0, ae)
    try:
        rows = prompts()[:2]
        query = NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in SCALARS), components=("resid_sae",))
        got = engine_rows(loaded, query, rows)
        for row in rows:
            seen = {}
            ref = Reference(loaded, row.text, extra=lambda h: h.add(
                "resid.post", 0, lambda x: seen.__setitem__("x", x[0].detach())))
            g = ref.grad("final")
            z, dz = ref.val("sae.resid.latent", 0), ref.grad("sae.resid.latent", 0)
            divisor = ae.normalise(seen["x"])[1].divisor  # (t, 1)
            for t in range(ref.T):
                for i in range(ae.n_latents):
                    want = {"act": z[t, i], "grad": dz[t, i], "act_times_grad": z[t, i] * dz[t, i],
                            "write_norm": z[t, i] * ae.W_dec[i].norm() / divisor[t, 0],
                            "direct_effect": z[t, i] * (ae.W_dec[i] @ g[t]) / divisor[t, 0]}
                    for s, value in want.items():
                        assert abs(got[(row.prompt_id, "resid_sae", 0, i, t, None)][s] - float(value)) <= 1e-5 * max(
                            1.0, abs(float(value))), (s, t, i)
    finally:
        loaded.detach_saes()


def test_trace_of_a_transcoder_latent_and_its_downstream_edge(tiny_model):
    """The traced pre-activation reads the MLP's input (ln2 scale held): upstream scalars against
    plain autograd; a layer-1 neuron reads the latent's write z·W_dec[i] through its frozen ln2,
    by forward-mode JVP."""
    from tdbql.query.plan import Trace

    from tests.executor.test_scalars import expected

    class WithInput(Reference):
        LOCATIONS = (*Reference.LOCATIONS, "mlp.in")

    loaded = tiny_model("gpt2")
    m = loaded.model
    tc = random_transcoder(loaded.config.d_model, 0, seed=6)
    loaded.attach_sae("mlp_tc", 0, tc)
    try:
        rows = prompts()[:2]
        probe, seen = HookSet(), {}
        probe.add("mlp.in", 0, lambda x: seen.__setitem__("in", x[0]))
        _run(loaded, probe)
        with torch.no_grad():
            m(torch.tensor([loaded.encode(rows[0].text)]), hooks=probe)
            i = int(tc.encode(seen["in"])[-1].argmax())  # on at the last token of the first prompt
        trace = Trace(node=NodeRef(component="mlp_tc", layer=0, index=i, token=-1))
        query = NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in (*SCALARS, "in_edge")),
                          components=("attn", "embed", "mlp"), trace=trace)
        got = engine_rows(loaded, query, rows)
        want, checked = {}, 0
        for row in rows:
            keep = {}

            def extra(hooks):
                hooks.add("ln2.scale", 0, lambda x: x.detach())
                hooks.add("ln2.scale", 1, lambda x: keep.__setitem__("s", x.detach()[0]))

            ref = WithInput(loaded, row.text, extra=extra,
                            objective=lambda r: tc.pre_activation(r.x[("mlp.in", 0)][0, -1])[i])
            upstream = lambda kind, layer: layer is None or (kind == "attn" and layer == 0)  # noqa: E731
            for (comp, layer, unit, t, u), values in expected(ref, ref.grad("resid.mid", 0), upstream).items():
                want[(row.prompt_id, comp, layer, unit, t, u)] = values
            t = ref.T - 1
            z = tc.encode(ref.val("mlp.in", 0))[t, i]
            w = z * tc.W_dec[i]
            read = ((w - w.mean()) / keep["s"][t] * m.blocks[1].ln2.weight) @ m.W_in(1)
            for j in range(loaded.config.d_mlp):
                assert abs(got[(row.prompt_id, "mlp", 1, j, t, None)]["in_edge"] - float(read[j])) < 1e-5
                checked += abs(float(read[j])) > 1e-3
        assert checked  # the latent is on at the last token: the edges are not all zero
        assert_matches({k: r for k, r in got.items() if k[1] != "mlp"}, want, SCALARS, ("attn", "embed"))
    finally:
        loaded.detach_saes()


def test_transcoder_statements_through_the_session(make_checkpoint, tmp_path):
    """`sae mlp_tc from`, then the transcoder's latents in a ranking, an ablation, a steer, upvoted
    and a patching sweep, as a user types them."""
    from tdbql.shell.session import Session

    folder = make_checkpoint("gpt2")
    session = Session(model=str(folder))
    d = session.loaded.config.d_model
    save_saelens(random_transcoder(d, 1, seed=8), tmp_path / "tc")
    (attached,) = session.execute(f"sae mlp_tc from '{tmp_path / 'tc'}'")
    assert "mlp_tc[1] (10 latents)" in attached.message
    session.execute('prompt "When Mary and John went to the store, John gave a drink to" '
                    'corrupt "When Mary and John went to the store, Mary gave a drink to"; target " Mary" vs " John"')
    for text in ["topk 50 act_times_grad of mlp_tc, mlp_tc_error",
                 "topk 5 act_times_grad of mlp ablate mlp_tc[1,2]=0",
                 "topk 5 act of mlp_tc steer resid.pre[1] += 3 * latent(mlp_tc_L1, 4)",
                 "upvoted mlp_tc[1,2]@-1 topk 3",
                 "patching of latent from clean",
                 "topk 4 act_times_grad of mlp_tc verify"]:
        (result,) = session.execute(text)
        assert result.table is not None and result.table.num_rows > 0, text
    ranked = session.execute("topk 50 act_times_grad of mlp_tc, mlp_tc_error")[0].table.to_pylist()
    assert {"mlp_tc", "mlp_tc_error"} == {r["component"] for r in ranked}
