"""Contribution maths against a direct transcription of LLM-TT's formula (docs/routes.md) that materialises every part.

The reference here builds the full tokens x tokens x heads x d_model tensor on tiny sizes (that is
the point), in float64; the executor's tiled functions run in float32 and must agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from tdbql.executor import contrib
from tdbql.query.errors import TdbqlError

EPS = 1e-5


# --- the direct transcription -------------------------------------------------------------------


def ref_contributions(parts: torch.Tensor, whole: torch.Tensor, norm: int) -> torch.Tensor:
    """parts [P, ..., d], whole [..., d] -> shares [P, ...]: max(|y| - |P_i - y|, eps), normalised over P."""
    dist = (parts - whole).norm(p=norm, dim=-1)
    prox = (whole.norm(p=norm, dim=-1) - dist).clamp(min=EPS)
    return prox / prox.sum(0, keepdim=True)


def ref_attention(resid_pre, resid_mid, probs, v, W_O, norm):
    """Materialise part[t,u,h,:] = A[h,t,u] * v[u,kv(h)] @ W_O[h]; parts are (u,h) plus resid_pre."""
    n_heads, n_kv = W_O.shape[0], v.shape[1]
    v_h = v.repeat_interleave(n_heads // n_kv, dim=1)  # [T, H, e]
    per_key = torch.einsum("uhe,hed->uhd", v_h, W_O)
    decomposed = probs.permute(1, 2, 0)[..., None] * per_key[None]  # [t, u, h, d]
    T, H = decomposed.shape[0], decomposed.shape[2]
    parts = decomposed.permute(1, 2, 0, 3).reshape(T * H, T, -1)  # [(u h), t, d]
    parts = torch.cat([parts, resid_pre[None]])
    shares = ref_contributions(parts, resid_mid, norm)  # [(u h) + 1, t]
    c_attn = shares[:-1].reshape(T, H, T).permute(2, 0, 1)  # [t, u, h]
    return c_attn, shares[-1]


def random_attention_layer(T=7, H=4, n_kv=4, e=5, d=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(H, T, T, generator=g, dtype=dtype)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    v = torch.randn(T, n_kv, e, generator=g, dtype=dtype)
    W_O = torch.randn(H, e, d, generator=g, dtype=dtype) / 2
    resid_pre = torch.randn(T, d, generator=g, dtype=dtype) * 3
    b_O = torch.randn(d, generator=g, dtype=dtype)
    attn_out = torch.einsum("htu,uhe,hed->td", probs, v.repeat_interleave(H // n_kv, dim=1), W_O) + b_O
    return resid_pre, resid_pre + attn_out, probs, v, W_O


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("n_kv", [4, 2])
@pytest.mark.parametrize("tile", [1, 30, 1 << 20])
def test_attention_matches_direct_transcription(norm, n_kv, tile):
    resid_pre, resid_mid, probs, v, W_O = random_attention_layer(n_kv=n_kv, seed=norm + n_kv)
    want_attn, want_res = ref_attention(resid_pre, resid_mid, probs, v, W_O, norm)
    f32 = [x.float() for x in (resid_pre, resid_mid, probs, v, W_O)]
    writes = contrib.per_key_head_writes(f32[3], f32[4])
    got_attn, got_res = contrib.attention_contributions(f32[0], f32[1], f32[2], writes, norm=norm, tile_elements=tile)
    assert got_attn.shape == want_attn.shape
    torch.testing.assert_close(got_attn.double(), want_attn, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_res.double(), want_res, atol=1e-5, rtol=0)
    total = got_attn.sum((1, 2)) + got_res
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


def test_future_keys_get_the_floor_and_count_in_the_denominator():
    resid_pre, resid_mid, probs, v, W_O = random_attention_layer(T=6, H=3, n_kv=3)
    writes = contrib.per_key_head_writes(v, W_O)
    c_attn, c_res = contrib.attention_contributions(resid_pre, resid_mid, probs, writes)
    prox_attn, prox_res = _proximities_from_shares(c_attn, c_res, resid_pre, resid_mid)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    torch.testing.assert_close(prox_attn[future], torch.full_like(prox_attn[future], EPS))
    assert (prox_res > EPS).all()


def _proximities_from_shares(c_attn, c_res, resid_pre, resid_mid):
    prox_res = (resid_mid.norm(p=1, dim=-1) - (resid_pre - resid_mid).norm(p=1, dim=-1)).clamp(min=EPS)
    scale = prox_res / c_res
    return c_attn * scale[:, None, None], prox_res


def test_query_subset_equals_rows_of_the_full_result():
    resid_pre, resid_mid, probs, v, W_O = random_attention_layer(T=9, seed=3)
    writes = contrib.per_key_head_writes(v, W_O)
    full_attn, full_res = contrib.attention_contributions(resid_pre, resid_mid, probs, writes)
    queries = torch.tensor([8, 2, 5])
    sub_attn, sub_res = contrib.attention_contributions(resid_pre, resid_mid, probs, writes, queries=queries, tile_elements=40)
    torch.testing.assert_close(sub_attn, full_attn[queries])
    torch.testing.assert_close(sub_res, full_res[queries])


@pytest.mark.parametrize("norm", [1, 2])
def test_mlp_block_and_neurons_match_direct_transcription(norm):
    g = torch.Generator().manual_seed(7)
    T, d, d_mlp = 5, 10, 16
    resid_mid = torch.randn(T, d, generator=g, dtype=torch.float64) * 2
    post = torch.randn(T, d_mlp, generator=g, dtype=torch.float64)
    W_out = torch.randn(d_mlp, d, generator=g, dtype=torch.float64) / 3
    b_out = torch.randn(d, generator=g, dtype=torch.float64)
    mlp_out = post @ W_out + b_out
    resid_post = resid_mid + mlp_out

    want_block = ref_contributions(torch.stack([mlp_out, resid_mid]), resid_post, norm)
    got_mlp, got_res = contrib.mlp_contributions(resid_mid.float(), mlp_out.float(), resid_post.float(), norm=norm)
    torch.testing.assert_close(got_mlp.double(), want_block[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_res.double(), want_block[1], atol=1e-5, rtol=0)

    parts = post.T[..., None] * W_out[:, None, :]  # [n, t, d]
    want_neurons = ref_contributions(torch.cat([parts, resid_mid[None]]), resid_post, norm)
    got_n, got_nres = contrib.neuron_contributions(
        resid_mid.float(), resid_post.float(), post.float(), W_out.float(), norm=norm, tile_elements=50
    )
    torch.testing.assert_close(got_n.double(), want_neurons[:-1].T, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_nres.double(), want_neurons[-1], atol=1e-5, rtol=0)


def test_half_precision_inputs_are_upcast():
    resid_pre, resid_mid, probs, v, W_O = random_attention_layer(seed=11)
    want_attn, _ = ref_attention(resid_pre, resid_mid, probs, v, W_O, 1)
    bf = [x.bfloat16() for x in (resid_pre, resid_mid, probs, v, W_O)]
    got_attn, got_res = contrib.attention_contributions(bf[0], bf[1], bf[2], contrib.per_key_head_writes(bf[3], bf[4]))
    assert got_attn.dtype == torch.float32
    torch.testing.assert_close(got_attn.double(), want_attn, atol=3e-2, rtol=0)


def test_threshold_and_renormalize_llmtt_example():
    blocks = torch.tensor([[0.05, 0.15]])
    residual = torch.tensor([0.8])
    kept, res = contrib.threshold_and_renormalize(blocks, residual, 0.1)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.15 / 0.95]]))
    torch.testing.assert_close(res, torch.tensor([0.8 / 0.95]))
    raw, raw_res = contrib.threshold_and_renormalize(blocks, residual, 0.1, renormalize=False)
    torch.testing.assert_close(raw, torch.tensor([[0.0, 0.15]]))
    torch.testing.assert_close(raw_res, residual)


def test_threshold_cutting_everything_gives_zeros_not_nan():
    kept, res = contrib.threshold_and_renormalize(torch.tensor([[0.01, 0.02]]), torch.tensor([0.03]), 0.5)
    assert torch.equal(kept, torch.zeros(1, 2)) and torch.equal(res, torch.zeros(1))


def test_bad_norm_is_a_user_error():
    with pytest.raises(TdbqlError, match="norm"):
        contrib.scaled_part_proximity(torch.ones(1, 1), torch.ones(1, 2), torch.ones(1, 2), norm=3)
