"""Attention of the one transformer, the norms it uses, masks and the KV cache.

Norms compute their scale (σ for LayerNorm, rms for RMSNorm) as an explicit tensor (float32 for
half-precision models, else the model's dtype) and pass it through a hook before dividing by it,
so a hook returning `scale.detach()` freezes the scale in the backward pass. Each norm's scale is
a location of hooks.py: ln1/ln2 (before attention and the MLP), ln1_post/ln2_post (on their
outputs, post-norm families), q_norm/k_norm (per head, or over all heads for OLMo 2: then one
scale per token, repeated for every head), ln_f.

Attention is computed eagerly (explicit logits and probabilities) for a layer that has a hook at
`attn.logits` or `attn.probs`, or whose logits are soft-capped, and with fused
`scaled_dot_product_attention` otherwise; `attn_impl="eager"` or `"sdpa"` forces one. Where the
fused kernel cannot run (forward-mode AD, i.e. a JVP) the layer falls back to eager by itself.
`attn.logits` is what the softmax reads: q·k times the scale, soft-capped (Gemma 2), masked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .hooks import HookSet
from .rotary import apply_rotary

if TYPE_CHECKING:
    from .model import _ForwardContext


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for reductions (norms, softmax); fp32/fp64 unchanged."""
    return x.float() if x.element_size() < 4 else x


class Norm(nn.Module):
    """LayerNorm or RMSNorm with the scale as an explicit, hookable tensor.

    `width` defaults to d_model. Given a (..., head, d_head) tensor whose last two dims together
    are `width` (OLMo 2's q/k norm over all heads), it normalises over both and hooks the scale
    repeated per head, (..., head, 1).
    """

    def __init__(self, cfg: ModelConfig, width: int | None = None) -> None:
        super().__init__()
        self.rms = cfg.norm == "rmsnorm"
        self.eps, self.offset, self.weight_fp32 = cfg.norm_eps, cfg.norm_offset, cfg.norm_weight_fp32
        self.weight = nn.Parameter(torch.ones(width or cfg.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(width or cfg.d_model))

    def forward(self, x: torch.Tensor, hooks: HookSet, location: str, layer: int | None) -> torch.Tensor:
        xf = upcast(x)  # (batch, token, d_model) or (batch, token, head, d_head)
        whole = x.shape[-1] != self.weight.shape[0]  # normalise the last two dims together
        dims = (-2, -1) if whole else (-1,)
        centred = xf if self.rms else xf - xf.mean(dims, keepdim=True)
        scale = torch.sqrt(centred.pow(2).mean(dims, keepdim=True) + self.eps)  # (..., 1)
        if whole:
            scale = scale.expand(*x.shape[:-1], 1)
        scale = hooks(location, layer, scale)
        weight = self.weight.view(x.shape[-2:]) if whole else self.weight
        if self.weight_fp32 or self.offset:  # Gemma, OLMo 2: (x / s) * w in float32, then cast
            out = ((centred / scale) * (upcast(weight) + self.offset)).to(x.dtype)
        else:
            out = (centred / scale).to(x.dtype) * weight
        return out if self.bias is None else out + self.bias

    def effective_weight(self) -> torch.Tensor:
        """What the normalised vector is multiplied by: weight (+ 1 for Gemma)."""
        return self.weight + self.offset if self.offset else self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_h, n_kv, d_h = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.q = nn.Linear(cfg.d_model, n_h * d_h, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.d_model, n_kv * d_h, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.d_model, n_kv * d_h, bias=cfg.qkv_bias)
        self.o = nn.Linear(n_h * d_h, cfg.d_model, bias=cfg.attn_out_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = Norm(cfg, n_h * d_h if full else d_h)
            self.k_norm = Norm(cfg, n_kv * d_h if full else d_h)

    def forward(self, h: torch.Tensor, ctx: _ForwardContext, layer: int) -> torch.Tensor:
        cfg, hooks = self.cfg, ctx.hooks
        B, T, _ = h.shape
        q = self.q(h).view(B, T, cfg.n_heads, cfg.d_head)
        k = self.k(h).view(B, T, cfg.n_kv_heads, cfg.d_head)
        v = self.v(h).view(B, T, cfg.n_kv_heads, cfg.d_head)
        if self.q_norm is not None:
            q = self.q_norm(q, hooks, "q_norm.scale", layer)
            k = self.k_norm(k, hooks, "k_norm.scale", layer)
        rotary = ctx.rotary(layer)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        q = hooks("attn.q", layer, q)  # (batch, token, head, d_head)
        k = hooks("attn.k", layer, k)  # (batch, token, kv_head, d_head)
        v = hooks("attn.v", layer, v)
        if ctx.cache is not None:  # keys and values of the earlier positions, then these
            k, v = ctx.cache.extend(layer, k, v)
        if ctx.eager(layer):
            z = self._eager(q, k, v, ctx, layer)
        else:
            try:
                z = self._fused(q, k, v, ctx, layer)
            except NotImplementedError:  # e.g. forward-mode AD (JVP): fused kernels lack it
                z = self._eager(q, k, v, ctx, layer)
        z = hooks("attn.z", layer, z)  # (batch, token, head, d_head)
        return self.o(z.reshape(B, T, cfg.n_heads * cfg.d_head))

    def _eager(self, q, k, v, ctx: _ForwardContext, layer: int) -> torch.Tensor:
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=2)  # (batch, key, head, d_head)
        v = v.repeat_interleave(group, dim=2)
        logits = torch.einsum("bthd,buhd->bhtu", q, k) * self.cfg.logit_scale
        cap = self.cfg.attn_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        logits = logits.masked_fill(~ctx.mask(layer), float("-inf"))
        logits = ctx.hooks("attn.logits", layer, logits)  # (batch, head, token, key)
        probs = torch.softmax(upcast(logits), dim=-1).to(q.dtype)
        probs = ctx.hooks("attn.probs", layer, probs)
        return torch.einsum("bhtu,buhd->bthd", probs, v)

    def _fused(self, q, k, v, ctx: _ForwardContext, layer: int) -> torch.Tensor:
        plain = ctx.plain_causal(layer)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (batch, head, token, d_head)
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if plain else ctx.mask(layer),
            is_causal=plain,
            scale=self.cfg.logit_scale,
            enable_gqa=self.cfg.n_kv_heads != self.cfg.n_heads,
        )
        return z.transpose(1, 2)  # (batch, token, head, d_head)


def attention_mask_4d(key_real, window: int | None, B: int, T: int, device, offset: int = 0) -> torch.Tensor:
    """(batch, 1, token, key) for T queries at positions offset.. over offset + T keys."""
    t = torch.arange(offset, offset + T, device=device)
    u = torch.arange(offset + T, device=device)
    allowed = u[None, :] <= t[:, None]  # (token, key) causal
    if window is not None:
        allowed &= t[:, None] - u[None, :] < window
    allowed = allowed[None, None].expand(B, 1, T, offset + T)
    if key_real is not None:
        # padding keys are hidden; the diagonal stays visible so no row is empty (a padding
        # query then attends to itself and real keys: its values are meaningless anyway)
        allowed = allowed & (key_real.bool()[:, None, None, :] | (u[None, :] == t[:, None]))
    return allowed


class KVCache:
    """Keys and values (after rotary and hooks) of the positions run so far, per layer, for
    incremental decoding: a forward with a cache reads them, appends its own, and advances."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=1), torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v
