"""One transformer, hooked at every activation location (see executor/runtime/hooks.py).

Every family is this network with different switches in `ModelConfig` (config.py holds the
table); attention and the norms are in attention.py.

The model calls `hooks(location, layer, x)` at each location and continues with what comes back.
Norm scales are hookable tensors (attention.py), so a hook returning `scale.detach()` freezes one.

Post-norm families (Gemma 2/3, OLMo 2) normalise each sublayer's output before adding it to the
residual: `attn.out` and `mlp.out` are the writes to the residual, after that norm; `W_O` and
`W_out` are read with the post-norm's weight folded in, so a head's or neuron's write at token t
is (z W_O[h]) / s[t] or a W_out[n] / s[t] with s the post-norm's scale there (`ln1_post.scale`,
`ln2_post.scale`; `write_scale_location` names it). Gemma's final logits are soft-capped
(`cap_logits`), and its token embeddings scaled by sqrt(d_model) (resid.embed is after that).

Batches are right-padded: real tokens first, `attention_mask[b, t]` True on real tokens,
positions 0..T-1 for every row. Weights never take gradients (requires_grad=False).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...query.catalog import SAE_SITES, TL_BLOCK_HOOKS, TL_GLOBAL_HOOKS
from ...query.errors import TdbqlError, nearest
from .attention import Attention, KVCache, Norm, attention_mask_4d, upcast
from .config import ACTIVATIONS, ModelConfig
from .hooks import GLOBAL_LOCATIONS, LOCATIONS, NO_HOOKS, HookSet
from .rotary import rotary_cos_sin

if TYPE_CHECKING:
    from .autoencoder import Autoencoder

__all__ = ["ACTIVATIONS", "KVCache", "ModelConfig", "Norm", "Transformer", "attention_mask_4d", "hook_alias",
           "upcast"]

AttnImpl = Literal["auto", "eager", "sdpa"]


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
        self.ln1 = Norm(cfg) if cfg.pre_norms else None
        self.attn = Attention(cfg)
        self.ln1_post = Norm(cfg) if cfg.post_norms else None
        self.ln2 = Norm(cfg) if cfg.pre_norms else None
        self.mlp = MLP(cfg)
        self.ln2_post = Norm(cfg) if cfg.post_norms else None
        self.saes: dict[str, Autoencoder] = {}  # site -> autoencoder (not a submodule: no state)

    def forward(self, x: torch.Tensor, ctx: _ForwardContext) -> torch.Tensor:
        hooks, layer = ctx.hooks, self.layer
        x = hooks("resid.pre", layer, x)  # (batch, token, d_model)
        attn_out = self.attn(_norm(self.ln1, x, hooks, "ln1.scale", layer), ctx, layer)
        attn_out = hooks("attn.out", layer, _norm(self.ln1_post, attn_out, hooks, "ln1_post.scale", layer))
        attn_out = self.splice("attn", attn_out, ctx)
        mid = hooks("resid.mid", layer, x + attn_out)
        mlp_in = hooks("mlp.in", layer, _norm(self.ln2, x if self.parallel else mid, hooks, "ln2.scale", layer))
        mlp_out = _norm(self.ln2_post, self.mlp(mlp_in, ctx, self), hooks, "ln2_post.scale", layer)
        mlp_out = hooks("mlp.out", layer, self.transcode(mlp_in, mlp_out, ctx))
        post = hooks("resid.post", layer, mid + mlp_out)
        return self.splice("resid", post, ctx)

    def splice(self, site: str, x: torch.Tensor, ctx: _ForwardContext) -> torch.Tensor:
        """Replace x by decode(z) + error, z and error hookable; unchanged value when unedited.

        The error is computed from the unedited latents, so editing z (ablation) keeps the error
        frozen. The hook sees a copy of z, so its gradient is ∂L/∂z through the decoder only. An
        autoencoder that normalises its input decodes with that token's coefficients, its
        divisor hookable at sae.<site>.scale.
        """
        ae = self.saes.get(site)
        if ae is None:
            return x
        x_in, norm = ae.normalise(x)
        z_clean = ae.activate(ae._linear(x_in))  # (batch, token, latent)
        error = x - ae.decode(z_clean, norm)
        if norm is not None:
            norm.divisor = ctx.hooks(f"sae.{site}.scale", self.layer, norm.divisor)
        z = ctx.hooks(f"sae.{site}.latent", self.layer, z_clean.clone())
        error = ctx.hooks(f"sae.{site}.error", self.layer, error)
        return ae.decode(z, norm) + error

    def transcode(self, mlp_in: torch.Tensor, mlp_out: torch.Tensor, ctx: _ForwardContext) -> torch.Tensor:
        """With a transcoder attached, the MLP's write becomes decode(z) + skip + error, where
        error = the MLP's true write minus the transcoder's (frozen under edits of z, as above)."""
        tc = self.saes.get("mlp_tc")
        if tc is None:
            return mlp_out
        z_clean = tc.encode(mlp_in)  # (batch, token, latent)
        skip = tc.skip(mlp_in)
        error = mlp_out - (tc.decode(z_clean) + skip)
        z = ctx.hooks("sae.mlp_tc.latent", self.layer, z_clean.clone())
        error = ctx.hooks("sae.mlp_tc.error", self.layer, error)
        return tc.decode(z) + skip + error


def _norm(norm: Norm | None, x: torch.Tensor, hooks: HookSet, location: str, layer: int) -> torch.Tensor:
    return x if norm is None else norm(x, hooks, location, layer)


class _ForwardContext:
    """What every layer of one forward pass shares: hooks, masks, rotary tables (global layers',
    and windowed layers' where they have their own rope base)."""

    def __init__(self, model: Transformer, input_ids: torch.Tensor, attention_mask, hooks: HookSet,
                 padded: bool | None = None, attn_impl: AttnImpl = "auto", cache: KVCache | None = None) -> None:
        self.cfg = model.cfg
        B, T = input_ids.shape
        device = input_ids.device
        self.hooks, self.attn_impl, self.cache = hooks, attn_impl, cache
        self.offset = 0 if cache is None else cache.length  # positions already in the cache
        self._rotary_args = (T, device, model.embed.weight.dtype, self.offset)
        self._rotary: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        if padded is None:  # (a compiled caller says so itself: reading the mask would break its graph)
            padded = attention_mask is not None and not bool(attention_mask.all())
        self._padded, self._n_keys = padded, self.offset + T
        self._mask_args = (attention_mask if padded else None, B, T, device, self.offset)
        self._masks: dict[int | None, torch.Tensor] = {}

    def rotary(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin (token, rotary_dim) for `layer`, None for learned positions."""
        if self.cfg.positions != "rotary":
            return None
        local = self.cfg.local_rope_theta is not None and self.cfg.window(layer) is not None
        if local not in self._rotary:
            self._rotary[local] = rotary_cos_sin(self.cfg, *self._rotary_args, local=local)
        return self._rotary[local]

    def plain_causal(self, layer: int) -> bool:
        """Whether `layer`'s mask is the plain causal one (no padding, window, or cache)."""
        window = self.cfg.window(layer)
        windowed = window is not None and self._n_keys > window
        return not self._padded and not windowed and self.offset == 0

    def mask(self, layer: int) -> torch.Tensor:
        """(batch, 1, token, key) bool, True where query t may attend to key u in `layer`."""
        window = self.cfg.window(layer)
        if window not in self._masks:
            key_real, *rest = self._mask_args
            self._masks[window] = attention_mask_4d(key_real, window, *rest)
        return self._masks[window]

    def eager(self, layer: int) -> bool:
        if self.attn_impl != "auto":
            return self.attn_impl == "eager" or self.cfg.attn_softcap is not None
        return (self.cfg.attn_softcap is not None  # the fused kernel has no soft-capping
                or self.hooks.has("attn.logits", layer) or self.hooks.has("attn.probs", layer))


def embedding(n: int, d: int) -> nn.Embedding:
    """nn.Embedding with its usual N(0, 1) init, except on the meta device (loading builds there and
    assigns the weights next): normal_'s meta kernel imports torch._dynamo on first use, about 1.5 s
    of every cold start."""
    weight = torch.empty(n, d)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(n, d, _weight=weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = embedding(cfg.n_ctx, cfg.d_model) if cfg.positions == "learned" else None
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
        `attn_impl`: "auto" (eager where probabilities are hooked or logits soft-capped), "eager"
        or "sdpa" (eager anyway where logits are soft-capped).
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
        if self.cfg.embed_scale != 1.0:  # Gemma: sqrt(d_model), rounded to the weights' dtype
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype, device=x.device)
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
        return hooks("logits", None, self.cap_logits(self.unembed(x)))

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """cap * tanh(logits / cap) where the family soft-caps its output logits (Gemma 2)."""
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def locations(self) -> tuple[str, ...]:
        """The hook locations this model's forward calls (autoencoder sites aside): the norm
        scales only of the norms the family has."""
        cfg = self.cfg
        absent = set()
        if not cfg.pre_norms:
            absent |= {"ln1.scale", "ln2.scale"}
        if not cfg.post_norms:
            absent |= {"ln1_post.scale", "ln2_post.scale"}
        if cfg.qk_norm == "none":
            absent |= {"q_norm.scale", "k_norm.scale"}
        return tuple(loc for loc in LOCATIONS if not loc.startswith("sae.") and loc not in absent)

    def write_scale_location(self, site: str) -> str | None:
        """The hook location of the post-norm scale that divides `site`'s ("attn" or "mlp")
        writes to the residual, None where the family has no post-norms."""
        if not self.cfg.post_norms:
            return None
        return {"attn": "ln1_post.scale", "mlp": "ln2_post.scale"}[site]

    # --- autoencoders ---

    def attach_sae(self, site: str, layer: int, ae: Autoencoder) -> None:
        """Splice `ae` at mlp (mlp.post), attn (attn.out) or resid (resid.post) of `layer`, or a
        transcoder at mlp_tc (reading mlp.in, writing mlp.out in place of the MLP)."""
        if site not in SAE_SITES:
            raise ValueError(f"unknown autoencoder site {site!r} ({', '.join(SAE_SITES)})")
        if not 0 <= layer < self.cfg.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.cfg.n_layers - 1}")
        if (site == "mlp_tc") != ae.transcoder:
            raise ValueError("transcoders go at mlp_tc, autoencoders at mlp, attn or resid")
        d_site = self.cfg.d_mlp if site == "mlp" else self.cfg.d_model
        if ae.d_in != d_site:
            raise ValueError(f"autoencoder reads {ae.d_in} dims but {site} has {d_site}")
        if ae.d_out != d_site:
            raise ValueError(f"autoencoder writes {ae.d_out} dims but {site} has {self.cfg.d_model}")
        if ae.transcoder and ae.reads == "resid.mid" and (self.cfg.pre_norms or self.cfg.parallel_residual):
            raise ValueError("the transcoder reads the residual before the MLP's norm (hook_resid_mid); tdbql "
                             "splices transcoders that read the MLP's input (ln2.hook_normalized)")
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
    def final_norm_weight(self) -> torch.Tensor:  # (d_model,), with Gemma's + 1
        return self.ln_f.effective_weight()

    @property
    def final_norm_bias(self) -> torch.Tensor | None:  # (d_model,)
        return self.ln_f.bias

    def W_in(self, layer: int) -> torch.Tensor:  # (d_model, d_mlp), the gate branch for GLU
        return self.blocks[layer].mlp.fc_in.weight.T

    def W_up(self, layer: int) -> torch.Tensor | None:  # (d_model, d_mlp), GLU only
        up = self.blocks[layer].mlp.fc_up
        return None if up is None else up.weight.T

    def W_out(self, layer: int) -> torch.Tensor:  # (d_mlp, d_model); post-norm weight folded in
        return self._post_norm_folded(self.blocks[layer].mlp.fc_out.weight.T, self.blocks[layer].ln2_post)

    def b_out(self, layer: int) -> torch.Tensor | None:  # (d_model,)
        return self.blocks[layer].mlp.fc_out.bias

    def W_Q(self, layer: int) -> torch.Tensor:  # (head, d_model, d_head)
        return self._split_heads(self.blocks[layer].attn.q.weight, self.cfg.n_heads)

    def W_K(self, layer: int) -> torch.Tensor:  # (kv_head, d_model, d_head)
        return self._split_heads(self.blocks[layer].attn.k.weight, self.cfg.n_kv_heads)

    def W_V(self, layer: int) -> torch.Tensor:  # (kv_head, d_model, d_head)
        return self._split_heads(self.blocks[layer].attn.v.weight, self.cfg.n_kv_heads)

    def W_O(self, layer: int) -> torch.Tensor:  # (head, d_head, d_model); post-norm weight folded in
        w = self._post_norm_folded(self.blocks[layer].attn.o.weight.T, self.blocks[layer].ln1_post)
        return w.reshape(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model)

    def b_O(self, layer: int) -> torch.Tensor | None:  # (d_model,)
        return self.blocks[layer].attn.o.bias

    @staticmethod
    def _post_norm_folded(w: torch.Tensor, post_norm: Norm | None) -> torch.Tensor:
        """(rows, d_model) writes times the post-norm's weight (post-norm families)."""
        return w if post_norm is None else w * post_norm.effective_weight()

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
