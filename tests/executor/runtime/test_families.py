"""Qwen3, Phi-3, OLMo 2, Gemma 2 and Gemma 3 (text) against transformers, switch by switch.

Each checkpoint is a random tiny model saved by transformers in the test (conftest.py): grouped
query attention (4 heads, 2 kv heads), prompts longer than the sliding windows (Phi-3: 5 on every
layer; Gemma 2: 4 on layer 0; Gemma 3: 4 on layer 0 with its own rope base), soft-capping small
enough to bite (Gemma 2: attention 3, logits 8).
"""

from __future__ import annotations

import json

import pytest
import torch
from tdbql.executor.runtime.hooks import GLOBAL_LOCATIONS, LOCATIONS, HookSet
from tdbql.executor.runtime.loading import load_model
from tdbql.executor.runtime.model import KVCache
from tdbql.query.errors import TdbqlError

from tests.executor.conftest import load_hf

FAMILIES = ["qwen3", "phi3", "olmo2", "gemma2", "gemma3"]
LONG = "When Mary and John went to the store, John gave a drink to"
PROMPTS = [LONG, "The cat sat", "one two three four five six seven"]


def capture(model, locations):
    seen: dict = {}
    hooks = HookSet()
    for loc in locations:
        for layer in [None] if loc in GLOBAL_LOCATIONS else range(model.cfg.n_layers):
            hooks.add(loc, layer, lambda x, key=(loc, layer): seen.__setitem__(key, x.detach().clone()))
    return hooks, seen


def right_padded(rows):
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


@pytest.mark.parametrize("arch", FAMILIES)
def test_logits_and_hidden_states_match_transformers(arch, make_checkpoint, tiny_model):
    folder = make_checkpoint(arch)
    ours, ref = tiny_model(arch), load_hf(folder)
    assert ours.config.n_kv_heads == 2 and ours.config.n_heads == 4  # grouped-query attention
    ids = torch.tensor([ours.encode(LONG)])
    assert ids.shape[1] > 2 * 5  # well past every window
    hooks, seen = capture(ours.model, ["resid.pre"])
    with torch.no_grad():
        logits = ours.model(ids, hooks=hooks)
        out = ref(ids, output_hidden_states=True)
    diff = (logits - out.logits).abs().max()
    assert diff < 1e-4, diff
    for layer in range(ours.config.n_layers):
        torch.testing.assert_close(seen[("resid.pre", layer)], out.hidden_states[layer], atol=1e-4, rtol=0)
    top = out.logits[0].topk(5, dim=-1).indices
    assert torch.equal(logits[0].topk(5, dim=-1).indices, top)


SWITCHES = {  # a switch each family needs: turned off, the logits move
    "qwen3": ("qk_norm", "none"),
    "olmo2": ("post_norms", False),
    "phi3": ("sliding_window", None),
    "gemma2": ("attn_softcap", None),
    "gemma3": ("local_rope_theta", None),
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_switch_matters(arch, tiny_model):
    loaded = tiny_model(arch)
    ids = torch.tensor([loaded.encode(LONG)])
    with torch.no_grad():
        before = loaded.model(ids)
        name, off = SWITCHES[arch]
        old = getattr(loaded.config, name)
        setattr(loaded.config, name, off)
        try:
            if name in ("qk_norm", "post_norms"):  # structural: rebuild the blocks' view of it
                for block in loaded.model.blocks:
                    saved = (block.attn.q_norm, block.attn.k_norm, block.ln1_post, block.ln2_post)
                    if name == "qk_norm":
                        block.attn.q_norm = block.attn.k_norm = None
                    else:
                        block.ln1_post = block.ln2_post = None
                    block._saved = saved
            after = loaded.model(ids)
        finally:
            setattr(loaded.config, name, old)
            for block in loaded.model.blocks:
                if hasattr(block, "_saved"):
                    block.attn.q_norm, block.attn.k_norm, block.ln1_post, block.ln2_post = block._saved
                    del block._saved
        assert (before - after).abs().max() > 1e-3
        torch.testing.assert_close(loaded.model(ids), before, atol=0, rtol=0)


def test_gemma2_final_soft_cap_bounds_the_logits(tiny_model):
    loaded = tiny_model("gemma2")
    with torch.no_grad():
        logits = loaded.model(torch.tensor([loaded.encode(LONG)]))
        final = _final_resid(loaded, LONG)
        uncapped = loaded.model.unembed(loaded.model.ln_f(final, HookSet(), "ln_f.scale", None))
    assert logits.abs().max() < 8.0 < uncapped.abs().max()
    torch.testing.assert_close(logits[0], 8.0 * torch.tanh(uncapped[0] / 8.0), atol=1e-5, rtol=0)


def _final_resid(loaded, text):
    hooks, seen = capture(loaded.model, ["resid.post"])
    loaded.model(torch.tensor([loaded.encode(text)]), hooks=hooks)
    return seen[("resid.post", loaded.config.n_layers - 1)]


@pytest.mark.parametrize("arch", FAMILIES)
def test_right_padded_batch_equals_prompts_one_by_one(arch, tiny_model):
    loaded = tiny_model(arch)
    rows = [loaded.encode(p) for p in PROMPTS]
    ids, mask = right_padded(rows)
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            batch = loaded.model(ids, attention_mask=mask, attn_impl=impl)
            for i, r in enumerate(rows):
                single = loaded.model(torch.tensor([r]), attn_impl="eager")
                torch.testing.assert_close(batch[i, : len(r)], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["phi3", "gemma2", "gemma3"])
def test_kv_cache_past_the_window_equals_the_full_forward(arch, tiny_model):
    loaded = tiny_model(arch)
    ids = torch.tensor([loaded.encode(LONG)])
    with torch.no_grad():
        full = loaded.model(ids)
        cache = KVCache()
        steps = [loaded.model(ids[:, :3], cache=cache)]
        for t in range(3, ids.shape[1]):
            steps.append(loaded.model(ids[:, t: t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_location_of_the_family_is_hooked_with_its_named_shape(arch, tiny_model):
    loaded = tiny_model(arch)
    c = loaded.config
    sizes = {"batch": 2, "token": 5, "d_model": c.d_model, "one": 1, "head": c.n_heads, "kv_head": c.n_kv_heads,
             "d_head": c.d_head, "key": 5, "d_mlp": c.d_mlp, "vocab": c.vocab_size}
    locations = loaded.model.locations()
    hooks, seen = capture(loaded.model, [loc for loc in LOCATIONS if not loc.startswith("sae.")])
    with torch.no_grad():
        loaded.model(torch.randint(0, 100, (2, 5)), hooks=hooks)
    assert {loc for loc, _ in seen} == set(locations)
    for loc in locations:
        for layer in [None] if loc in GLOBAL_LOCATIONS else range(c.n_layers):
            assert tuple(seen[(loc, layer)].shape) == tuple(sizes[d] for d in LOCATIONS[loc]), (loc, layer)
    norms = {"qwen3": {"q_norm.scale"}, "phi3": set(), "olmo2": {"q_norm.scale", "ln1_post.scale"},
             "gemma2": {"ln1.scale", "ln1_post.scale"}, "gemma3": {"ln1.scale", "q_norm.scale", "ln2_post.scale"}}
    assert norms[arch] <= set(locations)
    if arch == "olmo2":
        assert "ln1.scale" not in locations  # no pre-norms
        q_scale = seen[("q_norm.scale", 0)]  # one scale over all heads, repeated per head
        torch.testing.assert_close(q_scale, q_scale[:, :, :1].expand_as(q_scale))


@pytest.mark.parametrize("arch", ["olmo2", "gemma2"])
def test_post_norm_writes_are_the_folded_writes_over_the_scale(arch, tiny_model):
    """attn.out = Σ_h z[h] W_O[h] / s1 and mlp.out = post W_out / s2, with the post-norm's weight
    folded into W_O and W_out and s its scale at the token."""
    loaded = tiny_model(arch)
    m = loaded.model
    hooks, s = capture(m, m.locations())
    with torch.no_grad():
        m(torch.tensor([loaded.encode(LONG)]), hooks=hooks)
        for L in range(loaded.config.n_layers):
            heads = torch.einsum("bthe,hed->btd", s[("attn.z", L)], m.W_O(L))
            torch.testing.assert_close(s[("attn.out", L)], heads / s[("ln1_post.scale", L)], atol=1e-5, rtol=0)
            neurons = s[("mlp.post", L)] @ m.W_out(L)
            torch.testing.assert_close(s[("mlp.out", L)], neurons / s[("ln2_post.scale", L)], atol=1e-5, rtol=0)
            assert m.write_scale_location("mlp") == "ln2_post.scale"


def test_phi3_fused_projections_are_split_at_load(make_checkpoint, tiny_model):
    loaded = tiny_model("phi3")
    ref = load_hf(make_checkpoint("phi3"))
    c = loaded.config
    layer = ref.model.layers[1]
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    q_rows, kv_rows = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
    attn, mlp = loaded.model.blocks[1].attn, loaded.model.blocks[1].mlp
    torch.testing.assert_close(attn.q.weight, qkv[:q_rows])
    torch.testing.assert_close(attn.k.weight, qkv[q_rows: q_rows + kv_rows])
    torch.testing.assert_close(attn.v.weight, qkv[q_rows + kv_rows:])
    torch.testing.assert_close(mlp.fc_in.weight, gate_up[: c.d_mlp])
    torch.testing.assert_close(mlp.fc_up.weight, gate_up[c.d_mlp:])


def test_configs_read_every_switch(tiny_model):
    g2, g3 = tiny_model("gemma2").config, tiny_model("gemma3").config
    assert (g2.norm_offset, g2.post_norms, g2.attn_softcap, g2.final_softcap) == (1.0, True, 3.0, 8.0)
    assert g2.window_layers == (0,) and g2.sliding_window == 4 and g2.qk_norm == "none"
    assert g2.logit_scale == pytest.approx(12 ** -0.5) and g2.embed_scale == pytest.approx(32 ** 0.5)
    assert g3.qk_norm == "head" and g3.local_rope_theta == 50.0 and g3.rope_theta == 20000.0
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 4.0} and g3.final_softcap is None
    o2, q3, p3 = tiny_model("olmo2").config, tiny_model("qwen3").config, tiny_model("phi3").config
    assert (o2.pre_norms, o2.post_norms, o2.qk_norm) == (False, True, "full")
    assert q3.qk_norm == "head" and q3.d_head == 12 and q3.sliding_window is None
    assert p3.sliding_window == 5 and p3.window_layers is None and p3.rotary_dim == 4


def _copy_with_config(src, dst, **changes):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_windows_from_older_config_keys(make_checkpoint, tmp_path):
    """Without layer_types: Gemma 2 windows every other layer, Gemma 3 by sliding_window_pattern."""
    g2 = _copy_with_config(make_checkpoint("gemma2"), tmp_path / "g2", layer_types=None)
    assert load_model(str(g2)).config.window_layers == (0,)
    g3 = make_checkpoint("gemma3")
    old = json.loads((g3 / "config.json").read_text())
    local = old["rope_parameters"]["sliding_attention"]["rope_theta"]
    full = old["rope_parameters"]["full_attention"]
    folder = _copy_with_config(g3, tmp_path / "g3", layer_types=None, sliding_window_pattern=2, rope_parameters=None,
                               rope_theta=full["rope_theta"], rope_local_base_freq=local,
                               rope_scaling={"rope_type": "linear", "factor": 4.0})
    older, newer = load_model(str(folder)), load_model(str(g3))
    assert older.config.window_layers == (0,) and older.config.local_rope_theta == 50.0
    ids = torch.tensor([newer.encode(LONG)])
    with torch.no_grad():
        torch.testing.assert_close(older.model(ids), newer.model(ids), atol=0, rtol=0)


def test_unsupported_architecture_names_the_supported_ones(make_checkpoint, tmp_path):
    folder = _copy_with_config(make_checkpoint("qwen3"), tmp_path / "x", model_type="mamba")
    with pytest.raises(TdbqlError, match=r"unsupported model_type 'mamba' \(supported: gpt2, .*gemma2, gemma3_text, "
                                         r"gemma3, olmo2\)"):
        load_model(str(folder))


def test_unsupported_gemma_variants_are_clear_errors(make_checkpoint, tmp_path):
    bidi = _copy_with_config(make_checkpoint("gemma3"), tmp_path / "b", use_bidirectional_attention=True)
    with pytest.raises(TdbqlError, match="bidirectional attention is not supported"):
        load_model(str(bidi))
    kinds = _copy_with_config(make_checkpoint("gemma2"), tmp_path / "k", layer_types=["chunked", "full_attention"])
    with pytest.raises(TdbqlError, match="layer type 'chunked' is not supported"):
        load_model(str(kinds))
    biased = _copy_with_config(make_checkpoint("olmo2"), tmp_path / "o", attention_bias=True)
    with pytest.raises(TdbqlError, match="biases in a family with post-norms"):
        load_model(str(biased))


@pytest.mark.parametrize("name, expected", [
    ("blocks.3.ln1_post.hook_scale", ("ln1_post.scale", 3)),
    ("blocks.0.ln2_post.hook_scale", ("ln2_post.scale", 0)),
    ("blocks.2.q_norm.scale", ("q_norm.scale", 2)),
])
def test_hook_names_of_the_new_norms(name, expected):
    from tdbql.executor.runtime.model import hook_alias

    assert hook_alias(name) == expected


def test_gemma3_image_text_checkpoint_loads_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (vision tower, projector, language_model.* keys):
    tdbql loads the text model and skips the rest; text-only logits equal transformers'."""
    import transformers as tf

    from tests.executor.conftest import _TOKENIZER, _randomise, hf_config

    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=hf_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=300, boi_token_index=301, eoi_token_index=302)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(cfg)
    _randomise(model, 0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "tokenizer.json").write_text(_TOKENIZER())
    ours = load_model(str(tmp_path))
    assert ours.config.arch == "gemma3" and ours.config.n_layers == 2  # not the vision tower's 3
    ref = tf.Gemma3ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    ids = torch.tensor([ours.encode(LONG)])
    with torch.no_grad():
        assert (ours.model(ids) - ref(input_ids=ids).logits).abs().max() < 1e-4
