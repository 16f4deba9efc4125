"""Autoencoders and transcoders built and saved by the sae-lens package itself (6.54), loaded by
tdbql: latent activations equal `sae.encode`, and the spliced forward equals SAELens' own
reconstruction path.

sae-lens pulls transformer-lens 3.x while bench/ uses 4.x, so it lives in its own extra and
virtual environment: `.ci/run` builds .venv-saelens (torch, then `-e '.[saelens]'` and pytest)
and runs this file there. Without sae-lens these tests are skipped with that reason.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tdbql.executor.runtime.autoencoder import load_autoencoder
from tdbql.executor.runtime.hooks import HookSet

pytestmark = [
    pytest.mark.saelens,
    pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None,
                       reason="sae-lens is not installed (pip install -e '.[saelens]'; .ci/run runs this file "
                              "in .venv-saelens, apart from bench/'s transformer-lens 4)"),
]

TEXTS = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the mat"]


def randomised(sae, seed):
    """Random weights (sae-lens initialises b_enc, b_dec to zero and W_enc = W_dec.T)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.05 + 0.1 * torch.rand(p.shape, generator=gen) if name == "threshold" else 0.3 * noise)
    return sae.eval()


def standard(d, hook, seed=0, **cfg):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=96, **cfg))
    sae.cfg.metadata.hook_name = hook
    return randomised(sae, seed)


def jumprelu(d, hook, seed=1):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=80))
    sae.cfg.metadata.hook_name = hook
    return randomised(sae, seed)


def topk(d, hook, seed=2):
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=64, k=6, rescale_acts_by_decoder_norm=True))
    sae.cfg.metadata.hook_name = hook
    return randomised(sae, seed)


def transcoder(kind, d, layer, seed=3):
    from sae_lens.saes.transcoder import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )

    cls, cfg_cls = {"transcoder": (Transcoder, TranscoderConfig), "skip": (SkipTranscoder, SkipTranscoderConfig),
                    "jumprelu_skip": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)}[kind]
    tc = cls(cfg_cls(d_in=d, d_sae=72, d_out=d, apply_b_dec_to_input=False))
    tc.cfg.metadata.hook_name = f"blocks.{layer}.ln2.hook_normalized"
    tc.cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
    return randomised(tc, seed)


def captured(loaded, location, layer):
    """The site's activations for both prompts (no autoencoder attached), one prompt at a time."""
    out = []
    for text in TEXTS:
        seen = {}
        hooks = HookSet()
        hooks.add(location, layer, lambda x: seen.__setitem__("x", x[0].detach()))
        with torch.no_grad():
            loaded.model(torch.tensor([loaded.encode(text)]), hooks=hooks)
        out.append(seen["x"])
    return out


def logits(loaded, text, hooks=None):
    with torch.no_grad():
        return loaded.model(torch.tensor([loaded.encode(text)]), hooks=hooks)


CASES = {  # name -> (model, site location, layer, make(d, hook))
    "standard resid_pre": ("gpt2", "resid.post", 0, lambda d: standard(d, "blocks.1.hook_resid_pre")),
    "standard no b_dec on input": ("llama", "resid.post", 1,
                                   lambda d: standard(d, "blocks.1.hook_resid_post", apply_b_dec_to_input=False)),
    "constant_norm_rescale": ("gpt2", "attn.out", 1,
                              lambda d: standard(d, "blocks.1.hook_attn_out", normalize_activations="constant_norm_rescale")),
    "layer_norm": ("gemma2", "resid.post", 0, lambda d: standard(d, "blocks.0.hook_resid_post",
                                                                 normalize_activations="layer_norm")),
    "jumprelu mlp": ("gpt2", "mlp.post", 1, lambda d: jumprelu(d, "blocks.1.mlp.hook_post")),
    "topk rescaled by decoder norm": ("olmo2", "mlp.post", 0, lambda d: topk(d, "blocks.0.mlp.hook_post")),
}


@pytest.mark.parametrize("name", CASES)
def test_saes_saved_by_sae_lens_encode_and_splice_as_sae_lens_does(name, tiny_model, tmp_path):
    arch, location, layer, make = CASES[name]
    loaded = tiny_model(arch)
    d = loaded.config.d_mlp if location == "mlp.post" else loaded.config.d_model
    sae = make(d)
    sae.save_model(tmp_path / "sae")
    ours = load_autoencoder(tmp_path / "sae")
    site = {"mlp.post": "mlp", "attn.out": "attn", "resid.post": "resid"}[location]
    assert (ours.site, ours.layer) == (site, layer)
    xs = captured(loaded, location, layer)
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(ours.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
            assert (sae.encode(x) > 0).any()
            torch.testing.assert_close(ours(x), sae(x), atol=1e-5, rtol=1e-5)
    plain = [logits(loaded, text) for text in TEXTS]
    loaded.load_sae(tmp_path / "sae")
    try:
        for text, x, before in zip(TEXTS, xs, plain):
            torch.testing.assert_close(logits(loaded, text), before, atol=1e-5, rtol=0)  # the error term restores x
            no_error = HookSet()
            no_error.add(f"sae.{site}.error", layer, torch.zeros_like)
            with torch.no_grad():
                recon = sae(x)[None]
            swapped = HookSet()  # SAELens' reconstruction in place of the site, without tdbql's splice
            swapped.add(location, layer, lambda _, recon=recon: recon)
            spliced = logits(loaded, text, no_error)
            loaded.detach_saes()
            torch.testing.assert_close(spliced, logits(loaded, text, swapped), atol=1e-4, rtol=0)
            loaded.load_sae(tmp_path / "sae")
    finally:
        loaded.detach_saes()


@pytest.mark.parametrize("kind", ["transcoder", "skip", "jumprelu_skip"])
@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_transcoders_saved_by_sae_lens_replace_the_mlp(kind, arch, tiny_model, tmp_path):
    loaded = tiny_model(arch)
    layer = 1
    tc = transcoder(kind, loaded.config.d_model, layer)
    tc.save_model(tmp_path / "tc")
    ours = load_autoencoder(tmp_path / "tc")
    assert (ours.site, ours.layer, ours.transcoder, ours.W_skip is not None) == ("mlp_tc", layer, True, kind != "transcoder")
    inputs = captured(loaded, "mlp.in", layer)
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(ours.encode(x), tc.encode(x), atol=1e-5, rtol=1e-5)
            assert (tc.encode(x) > 0).any()
            torch.testing.assert_close(ours(x), tc(x), atol=1e-5, rtol=1e-5)
    plain = [logits(loaded, text) for text in TEXTS]
    loaded.load_sae(tmp_path / "tc")
    try:
        assert loaded.info().sae_latents == (("mlp_tc", layer, 72),)
        for text, x, before in zip(TEXTS, inputs, plain):
            torch.testing.assert_close(logits(loaded, text), before, atol=1e-5, rtol=0)
            no_error = HookSet()
            no_error.add("sae.mlp_tc.error", layer, torch.zeros_like)
            with torch.no_grad():
                out = tc(x)[None]  # SAELens' transcoder output in place of the MLP's write
            swapped = HookSet()
            swapped.add("mlp.out", layer, lambda _, out=out: out)
            spliced = logits(loaded, text, no_error)
            loaded.detach_saes()
            torch.testing.assert_close(spliced, logits(loaded, text, swapped), atol=1e-4, rtol=0)
            loaded.load_sae(tmp_path / "tc")
    finally:
        loaded.detach_saes()


def test_the_issue_case_through_the_session(make_checkpoint, tmp_path):
    """`sae resid from 'folder'` on an SAE saved by sae-lens 6 (hook_name under metadata), then
    its latents rank, and a transcoder's, in one query."""
    from tdbql.executor.runtime.loading import load_model
    from tdbql.shell.session import Session

    folder = make_checkpoint("gpt2")
    d = load_model(str(folder)).config.d_model
    standard(d, "blocks.1.hook_resid_pre").save_model(tmp_path / "sae")
    transcoder("skip", d, 0).save_model(tmp_path / "tc")
    session = Session(model=str(folder))
    session.execute(f"sae resid from '{tmp_path / 'sae'}'")
    session.execute(f"sae mlp_tc from '{tmp_path / 'tc'}'")
    session.execute('prompt "When Mary and John went to the store, John gave a drink to"; target " Mary" vs " John"')
    (result,) = session.execute("topk 400 act_times_grad of resid_sae, mlp_tc, mlp")
    assert {"resid_sae", "mlp_tc"} <= {r["component"] for r in result.table.to_pylist()}
