"""Autoencoders: both layouts against hand-written formulas, and splicing into the forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tdbql.executor.runtime.autoencoder import (
    Autoencoder,
    load_autoencoder,
    load_autoencoders,
    save_saelens,
    save_tdb,
    site_from_hook_name,
)
from tdbql.executor.runtime.hooks import HookSet
from tdbql.query.errors import TdbqlError

TEXT = "When Mary and John went to the store, John gave"
N_LATENTS = 24


def random_sae(d_in, site, layer, activation="relu", seed=0, **kwargs) -> Autoencoder:
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if activation == "topk":
        extra["k"] = 5
    if activation == "jumprelu":
        extra["threshold"] = 0.1 + 0.2 * torch.rand(N_LATENTS, generator=g)
    return Autoencoder(
        torch.randn(d_in, N_LATENTS, generator=g) / d_in**0.5,
        0.1 * torch.randn(N_LATENTS, generator=g),
        torch.randn(N_LATENTS, d_in, generator=g) / N_LATENTS**0.5,
        0.1 * torch.randn(d_in, generator=g),
        site=site, layer=layer, activation=activation, **extra, **kwargs,
    )


def site_dim(loaded, site):
    return loaded.config.d_mlp if site == "mlp" else loaded.config.d_model


def run(loaded, hooks=None):
    ids = torch.tensor([loaded.encode(TEXT)])
    return loaded.model(ids, hooks=hooks)


# --- layouts -------------------------------------------------------------------------------------------


def test_saelens_layout_matches_the_formulas(tmp_path):
    g = torch.Generator().manual_seed(1)
    W_enc, b_enc = torch.randn(8, N_LATENTS, generator=g), torch.randn(N_LATENTS, generator=g)
    W_dec, b_dec = torch.randn(N_LATENTS, 8, generator=g), torch.randn(8, generator=g)
    threshold = torch.rand(N_LATENTS, generator=g)
    folder = tmp_path / "sae"
    folder.mkdir()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold},
              str(folder / "sae_weights.safetensors"))
    x = torch.randn(3, 8, generator=g)
    cases = {
        ("standard", True): torch.relu((x - b_dec) @ W_enc + b_enc),
        ("standard", False): torch.relu(x @ W_enc + b_enc),
        ("jumprelu", True): ((x - b_dec) @ W_enc + b_enc) * (((x - b_dec) @ W_enc + b_enc) > threshold),
    }
    for (arch, sub), expected in cases.items():
        cfg = {"d_in": 8, "d_sae": N_LATENTS, "architecture": arch, "hook_name": "blocks.2.hook_resid_pre",
               "apply_b_dec_to_input": sub}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        ae = load_autoencoder(folder)
        assert (ae.site, ae.layer, ae.n_latents, ae.d_in) == ("resid", 1, N_LATENTS, 8)
        torch.testing.assert_close(ae.encode(x), expected)
        torch.testing.assert_close(ae.decode(expected), expected @ W_dec + b_dec)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk", "activation_fn_kwargs": {"k": 4}}))
    z = load_autoencoder(folder).encode(x)
    pre = (x - b_dec) @ W_enc + b_enc
    assert ((z != 0).sum(-1) <= 4).all()
    kept = pre >= pre.topk(4, dim=-1).values[:, -1:]
    torch.testing.assert_close(z, torch.where(kept, torch.relu(pre), torch.zeros_like(pre)))


def test_tdb_layout_matches_the_formulas(tmp_path):
    g = torch.Generator().manual_seed(2)
    enc, dec = torch.randn(N_LATENTS, 8, generator=g), torch.randn(8, N_LATENTS, generator=g)
    pre_bias, latent_bias = torch.randn(8, generator=g), torch.randn(N_LATENTS, generator=g)
    path = tmp_path / "mlp_post_act" / "3.safetensors"
    path.parent.mkdir()
    tensors = {"encoder.weight": enc, "decoder.weight": dec, "pre_bias": pre_bias, "latent_bias": latent_bias}
    save_file(tensors, str(path), metadata={"activation": "TopK", "k": "6"})
    ae = load_autoencoder(path)
    assert (ae.site, ae.layer, ae.activation, ae.k) == ("mlp", 3, "topk", 6)  # site and layer from the path
    x = torch.randn(4, 8, generator=g)
    pre = (x - pre_bias) @ enc.T + latent_bias
    top = pre.topk(6, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(ae.encode(x), expected)
    torch.testing.assert_close(ae.decode(expected), expected @ dec.T + pre_bias)
    save_file(tensors, str(path), metadata={"activation": "ReLU", "site": "attn", "layer": "0"})
    ae = load_autoencoder(path)
    assert (ae.site, ae.layer, ae.activation) == ("attn", 0, "relu")
    torch.testing.assert_close(ae.encode(x), torch.relu(pre))


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_save_and_load_round_trip(activation, tmp_path):
    ae = random_sae(16, "mlp", 1, activation)
    x = torch.randn(5, 16)
    layouts = [save_saelens(ae, tmp_path / "lens")]
    if activation != "jumprelu":
        layouts.append(save_tdb(ae, tmp_path / "tdb" / "mlp_L1.safetensors"))
    for path in layouts:
        back = load_autoencoder(path)
        assert (back.site, back.layer, back.activation, back.k) == ("mlp", 1, activation, ae.k)
        torch.testing.assert_close(back.decode(back.encode(x)), ae.decode(ae.encode(x)))


def test_folder_of_autoencoders_loads_every_one(tmp_path):
    for layer in (1, 0):
        save_saelens(random_sae(16, "mlp", layer, seed=layer), tmp_path / f"mlp_L{layer}")
    save_tdb(random_sae(8, "resid", 0), tmp_path / "resid_0.safetensors")
    assert [(ae.site, ae.layer) for ae in load_autoencoders(tmp_path)] == [("mlp", 0), ("mlp", 1), ("resid", 0)]
    with pytest.raises(TdbqlError, match="holds 3 autoencoders"):
        load_autoencoder(tmp_path)


@pytest.mark.parametrize(
    "hook_name, expected",
    [("blocks.3.mlp.hook_post", ("mlp", 3)), ("blocks.0.hook_attn_out", ("attn", 0)),
     ("blocks.2.hook_resid_post", ("resid", 2)), ("blocks.2.hook_resid_pre", ("resid", 1))],
)
def test_site_from_hook_name(hook_name, expected):
    assert site_from_hook_name(hook_name) == expected


@pytest.mark.parametrize("hook_name", ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "hook_embed", "nonsense"])
def test_unsupported_hook_names_are_clean_errors(hook_name):
    with pytest.raises(TdbqlError):
        site_from_hook_name(hook_name)


def test_bad_files_are_clean_errors(tmp_path):
    with pytest.raises(TdbqlError, match="not found"):
        load_autoencoder(tmp_path / "nope")
    with pytest.raises(TdbqlError, match="no autoencoder"):
        load_autoencoder(tmp_path)
    folder = save_saelens(random_sae(8, "mlp", 0), tmp_path / "gated")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(TdbqlError, match="'gated' is not supported"):
        load_autoencoder(folder)
    save_file({"encoder.weight": torch.zeros(4, 8)}, str(tmp_path / "mlp_1.safetensors"))
    with pytest.raises(TdbqlError, match="missing tensor"):
        load_autoencoder(tmp_path / "mlp_1.safetensors")


def test_attaching_the_wrong_width_is_a_clean_error(tiny_model):
    loaded = tiny_model("gpt2")
    with pytest.raises(TdbqlError, match="reads 16 dims but mlp has 128"):
        loaded.attach_sae("mlp", 0, random_sae(16, "mlp", 0))


# --- splicing --------------------------------------------------------------------------------------------

SITES = [("mlp", 1), ("attn", 0), ("resid", 0)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_splicing_leaves_the_forward_unchanged(arch, activation, tiny_model):
    loaded = tiny_model(arch)
    with torch.no_grad():
        clean = run(loaded)
        for site, layer in SITES:
            loaded.attach_sae(site, layer, random_sae(site_dim(loaded, site), site, layer, activation))
        spliced = run(loaded)
    assert (spliced - clean).abs().max() < 1e-5
    assert loaded.info().sae_latents == tuple(sorted((s, layer, N_LATENTS) for s, layer in SITES))
    loaded.detach_saes()
    assert loaded.info().sae_latents == ()


@pytest.mark.parametrize("site, layer", SITES)
def test_ablating_a_latent_moves_the_site_by_exactly_its_decoder_row(site, layer, tiny_model):
    loaded = tiny_model("gpt2")
    ae = random_sae(site_dim(loaded, site), site, layer)
    loaded.attach_sae(site, layer, ae)
    # where the splice's output is visible: mlp -> mlp.out (through W_out), attn -> resid.mid, resid -> next resid.pre
    watch = {"mlp": ("mlp.out", layer), "attn": ("resid.mid", layer), "resid": ("resid.pre", layer + 1)}[site]
    seen, latents = {}, {}
    clean_hooks = HookSet()
    clean_hooks.add(f"sae.{site}.latent", layer, lambda z: latents.setdefault("z", z.detach()))
    clean_hooks.add(*watch, lambda x: seen.setdefault("clean", x.detach()))
    with torch.no_grad():
        run(loaded, clean_hooks)
    z = latents["z"]
    token, latent = torch.nonzero(z[0] > 0)[0].tolist()

    def ablate(z):
        z = z.clone()
        z[0, token, latent] = 0
        return z

    hooks = HookSet()
    hooks.add(f"sae.{site}.latent", layer, ablate)
    hooks.add(*watch, lambda x: seen.setdefault("ablated", x.detach()))
    with torch.no_grad():
        run(loaded, hooks)
    change = seen["ablated"] - seen["clean"]
    expected = torch.zeros_like(change)
    expected[0, token] = -z[0, token, latent] * loaded.decoder_in_resid(site, layer)[latent]
    assert (change - expected).abs().max() < 1e-5
    assert expected.abs().max() > 1e-3


def test_error_hook_sees_the_reconstruction_error(tiny_model):
    loaded = tiny_model("llama")
    ae = random_sae(loaded.config.d_mlp, "mlp", 0)
    loaded.attach_sae("mlp", 0, ae)
    seen = {}
    hooks = HookSet()
    hooks.add("mlp.post", 0, lambda x: seen.setdefault("post", x.detach()))
    hooks.add("sae.mlp.error", 0, lambda e: seen.setdefault("error", e.detach()))
    with torch.no_grad():
        run(loaded, hooks)
    torch.testing.assert_close(seen["error"], seen["post"] - ae.decode(ae.encode(seen["post"])))


def test_latent_gradient_flows_through_the_decoder_only(tiny_model):
    """∂L/∂z = D_resid · ∂L/∂(mlp.out), and splicing leaves every upstream gradient unchanged."""
    loaded = tiny_model("gpt2")
    layer = 1
    grads = {}

    def grab(name):
        def hook(x):
            x.register_hook(lambda g: grads.__setitem__(name, g))
        return hook

    def backward():
        hooks = HookSet()
        hooks.add("resid.embed", None, lambda x: x.requires_grad_())
        hooks.add("resid.embed", None, grab("embed"))
        hooks.add("mlp.out", layer, grab("mlp_out"))
        if loaded.saes:
            hooks.add("sae.mlp.latent", layer, grab("z"))
        run(loaded, hooks)[0, -1, :5].sum().backward()
        return dict(grads)

    plain = backward()
    loaded.attach_sae("mlp", layer, random_sae(loaded.config.d_mlp, "mlp", layer))
    spliced = backward()
    torch.testing.assert_close(spliced["embed"], plain["embed"], atol=1e-5, rtol=1e-4)
    expected = spliced["mlp_out"] @ loaded.decoder_in_resid("mlp", layer).T  # (batch, token, latent)
    torch.testing.assert_close(spliced["z"], expected, atol=1e-5, rtol=1e-4)
    assert spliced["z"].abs().max() > 1e-4
