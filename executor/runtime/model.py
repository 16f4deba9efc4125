"""One transformer, hooked at every activation location (see executor/runtime/hooks.py).

GPT-2, GPT-NeoX/Pythia and the Llama family (Llama, Mistral, Qwen2) are the same network with
different switches in `ModelConfig`:

| switch              | GPT-2        | GPT-NeoX          | Llama / Mistral / Qwen2      |
|---------------------|--------------|-------------------|------------------------------|
| norm                | layernorm    | layernorm         | rmsnorm                      |
| positions           | learned      | rotary (partial)  | rotary (rope_theta, scaling) |
| gated_mlp (SwiGLU)  | no           | no                | yes                          |
| parallel_residual   | no           | config            | no                           |
| n_kv_heads          | = n_heads    | = n_heads         | grouped-query                |
| biases              | everywhere   | everywhere        | none (Qwen2: q, k, v)        |

The model calls `hooks(location, layer, x)` at each location and continues with what comes back.
Layer norms compute their scale (σ for LayerNorm, rms for RMSNorm) as an explicit tensor (float32
for half-precision models, else the model's dtype)
of shape (batch, token, 1) and pass it through the `ln1.scale` / `ln2.scale` / `ln_f.scale` hook
before dividing by it, so a hook returning `scale.detach()` freezes the scale in the backward pass.

Attention is computed eagerly (explicit logits and probabilities) for a layer that has a hook at
`attn.logits` or `attn.probs`, and with fused `scaled_dot_product_attention` otherwise; pass
`attn_impl="eager"` or `"sdpa"` to a forward call to force one. Where the fused kernel cannot run
(forward-mode AD, i.e. a JVP) the layer falls back to eager by itself.

Batches are right-padded: real tokens first, `attention_mask[b, t]` True on real tokens,
positions 0..T-1 for every row. Weights never take gradients (requires_grad=False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...query.catalog import SAE_SITES, TL_BLOCK_HOOKS, TL_GLOBAL_HOOKS
from ...query.errors import TdbqlError, nearest
from .hooks import GLOBAL_LOCATIONS, LOCATIONS, NO_HOOKS, HookSet
from .rotary import apply_rotary, rotary_cos_sin

if TYPE_CHECKING:
    from .autoencoder import Autoencoder

AttnImpl = Literal["auto", "eager", "sdpa"]
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")


@dataclass
class ModelConfig:
    arch: str  # "gpt2" | "gpt_neox" | "llama" | "mistral" | "qwen2"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    n_kv_heads: int | None = None  # None: = n_heads
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    act: str = "gelu_new"  # gelu_new | gelu | relu | silu
    gated_mlp: bool = False  # SwiGLU: down(act(gate(x)) * up(x))
    positions: Literal["learned", "rotary"] = "learned"
    rotary_dim: int = 0  # leading dims of each head that rotate (partial rotary)
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "linear"|"llama3", ...}
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    tied_embeddings: bool = False
    sliding_window: int | None = None  # key u visible from query t iff t - u < window

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"activation {self.act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


# --- layer norm -------------------------------------------------------------------------------


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for reductions (norms, softmax); fp32/fp64 unchanged."""
    return x.float() if x.element_size() < 4 else x


class Norm(nn.Module):
    """LayerNorm or RMSNorm with the scale as an explicit, hookable tensor."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: torch.Tensor, hooks: HookSet, location: str, layer: int | None) -> torch.Tensor:
        xf = upcast(x)  # (batch, token, d_model)
        centred = xf if self.rms else xf - xf.mean(-1, keepdim=True)
        scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)  # (batch, token, 1)
        scale = hooks(location, layer, scale)
        out = (centred / scale).to(x.dtype) * self.weight
        return out if self.bias is None else out + self.bias


# --- attention ----------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_h, n_kv, d_h = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.q = nn.Linear(cfg.d_model, n_h * d_h, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.d_model, n_kv * d_h, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.d_model, n_kv * d_h, bias=cfg.qkv_bias)
        self.o = nn.Linear(n_h * d_h, cfg.d_model, bias=cfg.attn_out_bias)

    def forward(self, h: torch.Tensor, ctx: _ForwardContext, layer: int) -> torch.Tensor:
        cfg, hooks = self.cfg, ctx.hooks
        B, T, _ = h.shape
        q = self.q(h).view(B, T, cfg.n_heads, cfg.d_head)
        k = self.k(h).view(B, T, cfg.n_kv_heads, cfg.d_head)
        v = self.v(h).view(B, T, cfg.n_kv_heads, cfg.d_head)
        if ctx.rotary is not None:
            q, k = apply_rotary(q, *ctx.rotary), apply_rotary(k, *ctx.rotary)
        q = hooks("attn.q", layer, q)  # (batch, token, head, d_head)
        k = hooks("attn.k", layer, k)  # (batch, token, kv_head, d_head)
        v = hooks("attn.v", layer, v)
        if ctx.cache is not None:  # keys and values of the earlier positions, then these
            k, v = ctx.cache.extend(layer, k, v)
        if ctx.eager(layer):
            z = self._eager(q, k, v, ctx, layer)
        else:
            try:
                z = self._fused(q, k, v, ctx)
            except NotImplementedError:  # e.g. forward-mode AD (JVP): fused kernels lack it
                z = self._eager(q, k, v, ctx, layer)
        z = hooks("attn.z", layer, z)  # (batch, token, head, d_head)
        return self.o(z.reshape(B, T, cfg.n_heads * cfg.d_head))

    def _eager(self, q, k, v, ctx: _ForwardContext, layer: int) -> torch.Tensor:
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=2)  # (batch, key, head, d_head)
        v = v.repeat_interleave(group, dim=2)
        logits = torch.einsum("bthd,buhd->bhtu", q, k) / math.sqrt(self.cfg.d_head)
        logits = logits.masked_fill(~ctx.mask, float("-inf"))
        logits = ctx.hooks("attn.logits", layer, logits)  # (batch, head, token, key)
        probs = torch.softmax(upcast(logits), dim=-1).to(q.dtype)
        probs = ctx.hooks("attn.probs", layer, probs)
        return torch.einsum("bhtu,buhd->bthd", probs, v)

    def _fused(self, q, k, v, ctx: _ForwardContext) -> torch.Tensor:
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (batch, head, token, d_head)
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if ctx.plain_causal else ctx.mask,
            is_causal=ctx.plain_causal,
            scale=1 / math.sqrt(self.cfg.d_head),
            enable_gqa=self.cfg.n_kv_heads != self.cfg.n_heads,
        )
        return z.transpose(1, 2)  # (batch, token, head, d_head)


# --- MLP ------------------------------------------------------------------------------------------


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    if name in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"activation {name!r} is not supported")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = cfg.act
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)  # gate branch for GLU
        self.fc_up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias) if cfg.gated_mlp else None
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, h: torch.Tensor, ctx: _ForwardContext, block: Block) -> torch.Tensor:
        layer = block.layer
        pre = ctx.hooks("mlp.pre", layer, self.fc_in(h))  # (batch, token, d_mlp)
        post = activation(self.act, pre)
        if self.fc_up is not None:
            post = post * self.fc_up(h)
        post = ctx.hooks("mlp.post", layer, post)
        post = block.splice("mlp", post, ctx)
        return self.fc_out(post)


# --- block and model -------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.parallel = cfg.parallel_residual
        self.ln1 = Norm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = Norm(cfg)
        self.mlp = MLP(cfg)
        self.saes: dict[str, Autoencoder] = {}  # site -> autoencoder (not a submodule: no state)

    def forward(self, x: torch.Tensor, ctx: _ForwardContext) -> torch.Tensor:
        hooks, layer = ctx.hooks, self.layer
        x = hooks("resid.pre", layer, x)  # (batch, token, d_model)
        attn_out = hooks("attn.out", layer, self.attn(self.ln1(x, hooks, "ln1.scale", layer), ctx, layer))
        attn_out = self.splice("attn", attn_out, ctx)
        mid = hooks("resid.mid", layer, x + attn_out)
        mlp_in = self.ln2(x if self.parallel else mid, hooks, "ln2.scale", layer)
        mlp_out = hooks("mlp.out", layer, self.mlp(mlp_in, ctx, self))
        post = hooks("resid.post", layer, mid + mlp_out)
        return self.splice("resid", post, ctx)

    def splice(self, site: str, x: torch.Tensor, ctx: _ForwardContext) -> torch.Tensor:
        """Replace x by decode(z) + error, z and error hookable; unchanged value when unedited.

        The error is computed from the unedited latents, so editing z (ablation) keeps the error
        frozen. The hook sees a copy of z, so its gradient is ∂L/∂z through the decoder only.
        """
        ae = self.saes.get(site)
        if ae is None:
            return x
        z_clean = ae.encode(x)  # (batch, token, latent)
        error = x - ae.decode(z_clean)
        z = ctx.hooks(f"sae.{site}.latent", self.layer, z_clean.clone())
        error = ctx.hooks(f"sae.{site}.error", self.layer, error)
        return ae.decode(z) + error


class _ForwardContext:
    """What every layer of one forward pass shares: hooks, mask, rotary tables."""

    def __init__(self, model: Transformer, input_ids: torch.Tensor, attention_mask, hooks: HookSet,
                 padded: bool | None = None, attn_impl: AttnImpl = "auto", cache: KVCache | None = None) -> None:
        cfg = model.cfg
        B, T = input_ids.shape
        device = input_ids.device
        self.hooks, self.attn_impl, self.cache = hooks, attn_impl, cache
        self.offset = 0 if cache is None else cache.length  # positions already in the cache
        dtype = model.embed.weight.dtype
        self.rotary = rotary_cos_sin(cfg, T, device, dtype, self.offset) if cfg.positions == "rotary" else None
        if padded is None:  # (a compiled caller says so itself: reading the mask would break its graph)
            padded = attention_mask is not None and not bool(attention_mask.all())
        windowed = cfg.sliding_window is not None and self.offset + T > cfg.sliding_window
        self.plain_causal = not padded and not windowed and self.offset == 0
        self._mask_args = (attention_mask if padded else None, cfg.sliding_window, B, T, device, self.offset)
        self._mask: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """(batch, 1, token, key) bool, True where query t may attend to key u."""
        if self._mask is None:
            self._mask = attention_mask_4d(*self._mask_args)
        return self._mask

    def eager(self, layer: int) -> bool:
        if self.attn_impl != "auto":
            return self.attn_impl == "eager"
        return self.hooks.has("attn.logits", layer) or self.hooks.has("attn.probs", layer)


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


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_f = Norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            self.unembed.weight = self.embed.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hooks: HookSet | None = None,
        *,
        padded: bool | None = None,
        logit_positions: torch.Tensor | None = None,
        attn_impl: AttnImpl = "auto",
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids (batch, token) -> logits (batch, token, vocab).

        `padded`: whether attention_mask hides any token (None: read it off the mask).
        `logit_positions` (batch,): unembed only that token of each row -> (batch, 1, vocab), for
        callers that read no other logits (the vocabulary matmul is the largest in small models).
        `attn_impl`: "auto" (eager where probabilities are hooked), "eager" or "sdpa".
        `cache`: a KVCache holding the earlier positions (incremental decoding: these tokens are
        the next ones); it is extended in place.
        """
        hooks = NO_HOOKS if hooks is None else hooks
        B, T = input_ids.shape
        offset = 0 if cache is None else cache.length
        if self.pos_embed is not None and offset + T > self.cfg.n_ctx:
            raise TdbqlError(f"{offset + T} tokens exceed the model's context of {self.cfg.n_ctx} positions")
        ctx = _ForwardContext(self, input_ids, attention_mask, hooks, padded, attn_impl, cache)
        x = self.embed(input_ids)  # (batch, token, d_model)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(offset, offset + T, device=input_ids.device))
        x = hooks("resid.embed", None, x)
        for block in self.blocks:
            x = block(x, ctx)
        x = self.ln_f(x, hooks, "ln_f.scale", None)
        if cache is not None:
            cache.length += T
        if logit_positions is not None:
            x = x[torch.arange(B, device=x.device), logit_positions][:, None]  # (batch, 1, d_model)
        return hooks("logits", None, self.unembed(x))

    # --- autoencoders ---

    def attach_sae(self, site: str, layer: int, ae: Autoencoder) -> None:
        """Splice `ae` at mlp (mlp.post), attn (attn.out) or resid (resid.post) of `layer`."""
        if site not in SAE_SITES:
            raise ValueError(f"unknown autoencoder site {site!r} (mlp, attn, resid)")
        if not 0 <= layer < self.cfg.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.cfg.n_layers - 1}")
        d_site = self.cfg.d_mlp if site == "mlp" else self.cfg.d_model
        if ae.d_in != d_site:
            raise ValueError(f"autoencoder reads {ae.d_in} dims but {site} has {d_site}")
        p = self.embed.weight
        ae.to(device=p.device, dtype=p.dtype).requires_grad_(False)
        self.blocks[layer].saes[site] = ae

    def detach_saes(self) -> None:
        for block in self.blocks:
            block.saes.clear()

    # --- weights in standard shapes ---

    @property
    def W_E(self) -> torch.Tensor:  # (vocab, d_model)
        return self.embed.weight

    @property
    def W_pos(self) -> torch.Tensor | None:  # (n_ctx, d_model)
        return None if self.pos_embed is None else self.pos_embed.weight

    @property
    def W_U(self) -> torch.Tensor:  # (d_model, vocab)
        return self.unembed.weight.T

    @property
    def b_U(self) -> torch.Tensor | None:  # (vocab,)
        return self.unembed.bias

    @property
    def final_norm_weight(self) -> torch.Tensor:  # (d_model,)
        return self.ln_f.weight

    @property
    def final_norm_bias(self) -> torch.Tensor | None:  # (d_model,)
        return self.ln_f.bias

    def W_in(self, layer: int) -> torch.Tensor:  # (d_model, d_mlp), the gate branch for GLU
        return self.blocks[layer].mlp.fc_in.weight.T

    def W_up(self, layer: int) -> torch.Tensor | None:  # (d_model, d_mlp), GLU only
        up = self.blocks[layer].mlp.fc_up
        return None if up is None else up.weight.T

    def W_out(self, layer: int) -> torch.Tensor:  # (d_mlp, d_model)
        return self.blocks[layer].mlp.fc_out.weight.T

    def b_out(self, layer: int) -> torch.Tensor | None:  # (d_model,)
        return self.blocks[layer].mlp.fc_out.bias

    def W_Q(self, layer: int) -> torch.Tensor:  # (head, d_model, d_head)
        return self._split_heads(self.blocks[layer].attn.q.weight, self.cfg.n_heads)

    def W_K(self, layer: int) -> torch.Tensor:  # (kv_head, d_model, d_head)
        return self._split_heads(self.blocks[layer].attn.k.weight, self.cfg.n_kv_heads)

    def W_V(self, layer: int) -> torch.Tensor:  # (kv_head, d_model, d_head)
        return self._split_heads(self.blocks[layer].attn.v.weight, self.cfg.n_kv_heads)

    def W_O(self, layer: int) -> torch.Tensor:  # (head, d_head, d_model)
        w = self.blocks[layer].attn.o.weight  # (d_model, head * d_head)
        return w.T.reshape(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model)

    def b_O(self, layer: int) -> torch.Tensor | None:  # (d_model,)
        return self.blocks[layer].attn.o.bias

    def _split_heads(self, w: torch.Tensor, n: int) -> torch.Tensor:
        # w: (n * d_head, d_model) -> (n, d_model, d_head)
        return w.reshape(n, self.cfg.d_head, self.cfg.d_model).transpose(1, 2)


# --- TransformerLens hook names (the table is the catalog's) ----------------------------------------


def hook_alias(name: str) -> tuple[str, int | None]:
    """A TransformerLens hook name ('blocks.5.mlp.hook_post') -> (location, layer).

    Also accepts our own names: 'blocks.5.mlp.post', 'resid.embed', 'ln_f.scale', 'logits'.
    hook_embed and hook_pos_embed both map to resid.embed (their sum). Raises ValueError.
    """
    if name in TL_GLOBAL_HOOKS:
        return TL_GLOBAL_HOOKS[name], None
    if name in GLOBAL_LOCATIONS:
        return name, None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        layer, rest = int(parts[1]), parts[2]
        if rest in TL_BLOCK_HOOKS:
            return TL_BLOCK_HOOKS[rest], layer
        if rest in LOCATIONS and rest not in GLOBAL_LOCATIONS:
            return rest, layer
    layer_text = parts[1] if len(parts) > 1 and parts[1].isdigit() else "0"
    close = nearest(name, [*TL_GLOBAL_HOOKS, *(f"blocks.{layer_text}.{k}" for k in TL_BLOCK_HOOKS)])
    hint = f"; did you mean {close!r}?" if close else ""
    raise ValueError(f"unknown hook name {name!r}{hint}")
