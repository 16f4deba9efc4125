"""The scalar catalog: every scalar is a small declared deriver.

A deriver names the raw tensors it needs (`Raw`: hook location, layer, forward or backward) and
computes, from those tensors, one value per node in a canonical layout with named dimensions

    (batch, token, key, unit)      -- `key` is the attended token for `attn`, size 1 otherwise;
                                      `unit` is the neuron, head or latent (size 1 for vectors)

Derivers are built from a few shared parts per node kind (act, grad, the unit write vector and
g, the gradient at the residual the objective reads), so `act_times_grad` is "act × grad" for
every kind, `direct_effect` is "act × (unit write · g)" and so on; there is no enum of combined
names. The engine takes the union of `needs` over the derivers of a query and installs only
those hooks.

Node kinds (the `component` column):
- `mlp` (t, n): a = mlp.post.
- `attn` (t, u, h): A = attn.probs; unit write = v[u] W_O[h].
- `head` (t, h): attention summed over keys u (act = Σ_u A, 1 unless ablated); write_norm is the
  norm of the summed write ‖z[t,h] W_O[h]‖ (TDB's per-sequence-token write norm).
- `mlp_sae` / `attn_sae` / `resid_sae` (t, i): z = the latent; unit write = decoder row in the
  residual basis (W_dec @ W_out for the mlp site).
- vector nodes, one per token: `embed` (the token + position embedding x) and
  `<site>_sae_error` (the autoencoder's reconstruction error e). TDB's convention: act = 1,
  grad = act_times_grad = x·∂L/∂x, write_norm = ‖write‖, direct_effect = write·g.
  `token_attribution` is `embed`'s act_times_grad; `sae_error` is ‖e‖ on error rows.

`attrib_patch` (attribution patching) works on prompt pairs: the prompt set is read as
consecutive (clean, corrupted) pairs — prompts 0 and 1, 2 and 3, ... in the order given, both
of a pair with the same number of tokens. The value, reported on the clean prompt's rows, is
(act_clean − act_corrupt) · grad_corrupt (for vector nodes (x_clean − x_corrupt)·∂L/∂x_corrupt),
where grad_corrupt is the gradient of the corrupted prompt's own loss. Corrupted prompts give
no rows.

`in_edge` needs a trace of a node X and is the weight of the edge between every node and X:
for a node N upstream of X it is N's write · ∂pre_X/∂(residual X reads) (gradient, many → one;
equal to direct_effect under the same trace); for a node M downstream of X it is the
forward-mode derivative (JVP) of M's pre-activation along X's write, through the residual stream
only (one → many; every layer-norm scale frozen). Nodes neither side give 0. Defined for mlp,
attn and latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from einops import rearrange

Pass = Literal["fwd", "bwd", "jvp"]

SAE_KINDS = {"mlp_sae": "mlp", "attn_sae": "attn", "resid_sae": "resid"}
ERROR_KINDS = {"mlp_sae_error": "mlp", "attn_sae_error": "attn", "resid_sae_error": "resid"}
VECTOR_KINDS = ("embed", *ERROR_KINDS)
ALL_KINDS = ("embed", "attn", "head", "mlp", "attn_sae", "attn_sae_error", "mlp_sae", "mlp_sae_error",
             "resid_sae", "resid_sae_error")
KIND_CODE = {k: i for i, k in enumerate(ALL_KINDS)}


@dataclass(frozen=True, order=True)
class Raw:
    """A raw tensor: the value at a hook location in the forward pass ("fwd"), its gradient
    ("bwd"), or its tangent in the forward-mode pass ("jvp")."""

    location: str
    layer: int | None
    pass_: Pass = "fwd"


@dataclass(frozen=True)
class Site:
    """Where a deriver is evaluated: a node kind at a layer, with the gradient location `g`
    (None when the plan has no backward) and whether the kind writes strictly upstream of it."""

    kind: str
    layer: int | None
    g: Raw | None = None
    upstream: bool = True
    jvp: bool = False  # in_edge of nodes downstream of the trace needs the JVP pass

    @property
    def sae_site(self) -> str | None:
        return SAE_KINDS.get(self.kind) or ERROR_KINDS.get(self.kind)


class Context:
    """Evaluation of parts for one site and one batch: raw tensors, weights, memoised parts."""

    def __init__(self, site: Site, raw: Callable[[Raw], torch.Tensor], weights: Weights) -> None:
        self.site, self._raw, self.weights = site, raw, weights
        self._memo: dict[str, torch.Tensor] = {}

    def raw(self, location: str, pass_: Pass = "fwd") -> torch.Tensor:
        return self._raw(Raw(location, self.site.layer, pass_))

    def g(self) -> torch.Tensor:  # (batch, token, d_model)
        return self._raw(self.site.g)

    def part(self, name: str) -> torch.Tensor:
        if name not in self._memo:
            self._memo[name] = PARTS[_family(self.site.kind)][name].fn(self)
        return self._memo[name]


class Weights:
    """Model weights a deriver reads, in standard shapes; decoder-in-residual rows cached."""

    def __init__(self, model, saes: dict) -> None:
        self.model, self.saes = model, saes
        self._cache: dict = {}

    def cached(self, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def W_out(self, layer: int) -> torch.Tensor:  # (d_mlp, d_model)
        return self.model.W_out(layer)

    def W_O(self, layer: int) -> torch.Tensor:  # (head, d_head, d_model)
        return self.model.W_O(layer)

    def decoder(self, site: str, layer: int) -> torch.Tensor:  # (latent, d_model)
        ae = self.saes[(site, layer)]
        if site == "mlp":
            return self.cached(("dec", site, layer, id(ae)), lambda: ae.W_dec @ self.model.W_out(layer))
        return ae.W_dec

    def to_resid(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A vector in the site's basis written to the residual stream (mlp: through W_out)."""
        return x @ self.model.W_out(layer) if site == "mlp" else x


# --- parts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A shared piece of a deriver: the raw tensors it reads and how it computes its value.
    `uses` names the other parts of the same family it calls (their needs are included)."""

    needs: Callable[[Site], frozenset[Raw]]
    fn: Callable[[Context], torch.Tensor]
    uses: tuple[str, ...] = ()


def _at(location_of: Callable[[Site], str], pass_: Pass = "fwd") -> Callable[[Site], frozenset[Raw]]:
    return lambda s: frozenset({Raw(location_of(s), s.layer, pass_)})


def _fixed(location: str, pass_: Pass = "fwd") -> Callable[[Site], frozenset[Raw]]:
    return _at(lambda s: location, pass_)


def _g_need(extra: Callable[[Site], frozenset[Raw]] | None = None) -> Callable[[Site], frozenset[Raw]]:
    def needs(s: Site) -> frozenset[Raw]:
        own = extra(s) if extra else frozenset()
        return own | ({s.g} if s.g is not None and s.upstream else frozenset())

    return needs


def _none(s: Site) -> frozenset[Raw]:
    return frozenset()


def _latent_loc(s: Site) -> str:
    return f"sae.{s.sae_site}.latent"


def _error_loc(s: Site) -> str:
    return f"sae.{s.sae_site}.error"


def _zeros_unless_upstream(ctx: Context, compute: Callable[[], torch.Tensor], like: str) -> torch.Tensor:
    """Direct effects of nodes that do not write strictly upstream of g are 0 (TDB)."""
    if ctx.site.upstream:
        return compute()
    return torch.zeros_like(ctx.part(like))


# MLP neurons: raw (batch, token, neuron) -> (batch, token, 1, neuron)
def _mlp_direct(ctx: Context) -> torch.Tensor:
    def compute():
        read = torch.einsum("btd,nd->btn", ctx.g(), ctx.weights.W_out(ctx.site.layer))
        return ctx.part("act") * read[:, :, None, :]

    return _zeros_unless_upstream(ctx, compute, "act")


MLP_PARTS = {
    "act": Part(_fixed("mlp.post"), lambda c: c.raw("mlp.post")[:, :, None, :]),
    "grad": Part(_fixed("mlp.post", "bwd"), lambda c: c.raw("mlp.post", "bwd")[:, :, None, :]),
    "write_norm": Part(_none, lambda c: c.part("act") * c.weights.W_out(c.site.layer).norm(dim=-1), ("act",)),
    "direct_effect": Part(_g_need(), _mlp_direct, ("act",)),
    "jvp_pre": Part(_fixed("mlp.pre", "jvp"), lambda c: c.raw("mlp.pre", "jvp")[:, :, None, :]),
}


# Attention (query t, key u, head h): probs (batch, head, token, key) -> (batch, token, key, head)
def _value_heads(ctx: Context) -> torch.Tensor:
    """v per query head: (batch, key, head, d_head) (grouped-query heads share kv heads)."""
    v = ctx.raw("attn.v")
    group = ctx.weights.W_O(ctx.site.layer).shape[0] // v.shape[2]
    return v.repeat_interleave(group, dim=2)


def _attn_write_norm(ctx: Context) -> torch.Tensor:
    write = torch.einsum("buhe,hed->buhd", _value_heads(ctx), ctx.weights.W_O(ctx.site.layer))
    return ctx.part("act") * write.norm(dim=-1)[:, None, :, :]  # A · ‖v[u] W_O[h]‖


def _attn_direct(ctx: Context) -> torch.Tensor:
    def compute():
        g_read = torch.einsum("btd,hed->bthe", ctx.g(), ctx.weights.W_O(ctx.site.layer))
        return ctx.part("act") * torch.einsum("buhe,bthe->btuh", _value_heads(ctx), g_read)

    return _zeros_unless_upstream(ctx, compute, "act")


def _probs_layout(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b h t u -> b t u h")


ATTN_PARTS = {
    "act": Part(_fixed("attn.probs"), lambda c: _probs_layout(c.raw("attn.probs"))),
    "grad": Part(_fixed("attn.probs", "bwd"), lambda c: _probs_layout(c.raw("attn.probs", "bwd"))),
    "write_norm": Part(_fixed("attn.v"), _attn_write_norm, ("act",)),
    "direct_effect": Part(_g_need(_fixed("attn.v")), _attn_direct, ("act",)),
    "jvp_pre": Part(_fixed("attn.logits", "jvp"), lambda c: _probs_layout(c.raw("attn.logits", "jvp"))),
}


# Heads: attention summed over keys u <= t -> (batch, token, 1, head)
def _causal_sum(x: torch.Tensor) -> torch.Tensor:
    """(batch, token, key, head) summed over keys u <= t (gradients at hidden keys are not zero)."""
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return torch.where(causal[None, :, :, None], x, 0).sum(2, keepdim=True)


def _sum_keys(c: Context, part: str) -> torch.Tensor:
    return _causal_sum(_probs_layout(c.raw("attn.probs", "bwd" if part == "grad" else "fwd")))


def _head_write(ctx: Context) -> torch.Tensor:  # (batch, token, head, d_model)
    return torch.einsum("bthe,hed->bthd", ctx.raw("attn.z"), ctx.weights.W_O(ctx.site.layer))


def _head_direct(ctx: Context) -> torch.Tensor:
    def compute():
        return torch.einsum("bthd,btd->bth", _head_write(ctx), ctx.g())[:, :, None, :]

    return _zeros_unless_upstream(ctx, compute, "write_norm")


def _head_times_grad(ctx: Context) -> torch.Tensor:
    probs = _probs_layout(ctx.raw("attn.probs"))
    return _causal_sum(probs * _probs_layout(ctx.raw("attn.probs", "bwd")))


HEAD_PARTS = {
    "act": Part(_fixed("attn.probs"), lambda c: _sum_keys(c, "act")),
    "grad": Part(_fixed("attn.probs", "bwd"), lambda c: _sum_keys(c, "grad")),
    "act_times_grad": Part(
        lambda s: frozenset({Raw("attn.probs", s.layer), Raw("attn.probs", s.layer, "bwd")}), _head_times_grad
    ),
    "write_norm": Part(_fixed("attn.z"), lambda c: _head_write(c).norm(dim=-1)[:, :, None, :]),
    "direct_effect": Part(_g_need(_fixed("attn.z")), _head_direct, ("write_norm",)),
}


# Autoencoder latents: (batch, token, latent) -> (batch, token, 1, latent)
def _sae_direct(ctx: Context) -> torch.Tensor:
    def compute():
        decoder = ctx.weights.decoder(ctx.site.sae_site, ctx.site.layer)
        return ctx.part("act") * torch.einsum("btd,id->bti", ctx.g(), decoder)[:, :, None, :]

    return _zeros_unless_upstream(ctx, compute, "act")


def _sae_write_norm(ctx: Context) -> torch.Tensor:
    return ctx.part("act") * ctx.weights.decoder(ctx.site.sae_site, ctx.site.layer).norm(dim=-1)


def _sae_jvp_pre(ctx: Context) -> torch.Tensor:
    """Tangent of the encoder pre-activation: (tangent of the SAE input) @ W_enc."""
    ae = ctx.weights.saes[(ctx.site.sae_site, ctx.site.layer)]
    return (ctx.raw(SAE_INPUT[ctx.site.sae_site], "jvp") @ ae.W_enc)[:, :, None, :]


SAE_INPUT = {"mlp": "mlp.post", "attn": "attn.out", "resid": "resid.post"}

SAE_PARTS = {
    "act": Part(_at(_latent_loc), lambda c: c.raw(_latent_loc(c.site))[:, :, None, :]),
    "grad": Part(_at(_latent_loc, "bwd"), lambda c: c.raw(_latent_loc(c.site), "bwd")[:, :, None, :]),
    "write_norm": Part(_none, _sae_write_norm, ("act",)),
    "direct_effect": Part(_g_need(), _sae_direct, ("act",)),
    "jvp_pre": Part(_at(lambda s: SAE_INPUT[s.sae_site], "jvp"), _sae_jvp_pre),
}


# Vector nodes (embedding, autoencoder error): one per token -> (batch, token, 1, 1)
def _vector_loc(s: Site) -> str:
    return "resid.embed" if s.kind == "embed" else _error_loc(s)


def _vector(ctx: Context, pass_: Pass = "fwd") -> torch.Tensor:
    return ctx.raw(_vector_loc(ctx.site), pass_)


def _vector_write(ctx: Context) -> torch.Tensor:  # (batch, token, d_model)
    x = _vector(ctx)
    return x if ctx.site.kind == "embed" else ctx.weights.to_resid(ctx.site.sae_site, ctx.site.layer, x)


def _per_token(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, None, None]


def _vector_direct(ctx: Context) -> torch.Tensor:
    def compute():
        return _per_token((_vector_write(ctx) * ctx.g()).sum(-1))

    return _zeros_unless_upstream(ctx, compute, "act")


def _vector_times_grad(ctx: Context) -> torch.Tensor:
    return _per_token((_vector(ctx) * _vector(ctx, "bwd")).sum(-1))


_VECTOR_BOTH = lambda s: frozenset({Raw(_vector_loc(s), s.layer), Raw(_vector_loc(s), s.layer, "bwd")})  # noqa: E731

VECTOR_PARTS = {
    "act": Part(_at(_vector_loc), lambda c: torch.ones_like(_per_token(_vector(c)[..., 0]))),
    "grad": Part(_VECTOR_BOTH, _vector_times_grad),
    "act_times_grad": Part(_VECTOR_BOTH, _vector_times_grad),
    "write_norm": Part(_at(_vector_loc), lambda c: _per_token(_vector_write(c).norm(dim=-1))),
    "direct_effect": Part(_g_need(_at(_vector_loc)), _vector_direct, ("act",)),
    "norm": Part(_at(_vector_loc), lambda c: _per_token(_vector(c).norm(dim=-1))),
}

PARTS: dict[str, dict[str, Part]] = {
    "mlp": MLP_PARTS,
    "attn": ATTN_PARTS,
    "head": HEAD_PARTS,
    "sae": SAE_PARTS,
    "vector": VECTOR_PARTS,
}


def _family(kind: str) -> str:
    if kind in SAE_KINDS:
        return "sae"
    if kind in VECTOR_KINDS:
        return "vector"
    return kind


# --- derivers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deriver:
    """One scalar on one node kind: the parts it combines and how."""

    scalar: str
    parts: tuple[str, ...]
    combine: Callable[..., torch.Tensor] = field(default=lambda x: x)
    pair: bool = False  # computes across (clean, corrupted) prompt pairs
    jvp: bool = False  # reads tangents of the forward-mode pass
    external: bool = False  # values come from another module's pass (contribution: executor/contrib.py)

    def needs(self, site: Site) -> frozenset[Raw]:
        table = PARTS[_family(site.kind)]
        out: set[Raw] = set()
        pending = list(self.parts)
        while pending:
            part = table[pending.pop()]
            out |= part.needs(site)
            pending.extend(part.uses)
        return frozenset(out)

    def compute(self, ctx: Context) -> torch.Tensor:
        """Values in the layout (batch, token, key, unit)."""
        return self.combine(*(ctx.part(p) for p in self.parts))


def _product(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return act * grad


def _attrib_patch(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(act_clean − act_corrupt) · grad_corrupt on clean rows (even batch index), 0 on corrupted."""
    out = torch.zeros_like(act)
    out[0::2] = (act[0::2] - act[1::2]) * grad[1::2]
    return out


def _vector_patch(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    out[0::2] = ((x[0::2] - x[1::2]) * grad[1::2]).sum(-1)
    return _per_token(out)


def deriver(scalar: str, kind: str, *, upstream_of_trace: bool = True) -> Deriver | None:
    """The deriver of `scalar` on `kind`, or None where the scalar is not defined for it."""
    family = _family(kind)
    table = PARTS[family]
    if scalar in ("act", "grad", "write_norm", "direct_effect"):
        return Deriver(scalar, (scalar,))
    if scalar == "act_times_grad":
        if "act_times_grad" in table:
            return Deriver(scalar, ("act_times_grad",))
        return Deriver(scalar, ("act", "grad"), _product)
    if scalar == "token_attribution":
        return Deriver(scalar, ("act_times_grad",)) if kind == "embed" else None
    if scalar == "sae_error":
        return Deriver(scalar, ("norm",)) if kind in ERROR_KINDS else None
    if scalar == "attrib_patch":
        return _patch_deriver(kind)
    if scalar == "contribution":
        return Deriver(scalar, (), external=True) if kind in CONTRIBUTION_KINDS else None
    if scalar == "in_edge":
        if kind not in ("mlp", "attn", *SAE_KINDS):
            return None
        if upstream_of_trace:
            return Deriver(scalar, ("direct_effect",))
        return Deriver(scalar, ("jvp_pre",), jvp=True)
    return None


def _patch_deriver(kind: str) -> Deriver:
    if kind in VECTOR_KINDS:
        return Deriver("attrib_patch", ("x", "dx"), _vector_patch, pair=True)
    if kind == "head":
        return Deriver("attrib_patch", ("act_keys", "grad_keys"),
                       lambda a, g: _causal_sum(_attrib_patch(a, g)), pair=True)
    return Deriver("attrib_patch", ("act", "grad"), _attrib_patch, pair=True)


# raw per-key tensors for the head's pair scalar; raw vectors for vector nodes' pair scalar
HEAD_PARTS["act_keys"] = Part(_fixed("attn.probs"), lambda c: _probs_layout(c.raw("attn.probs")))
HEAD_PARTS["grad_keys"] = Part(_fixed("attn.probs", "bwd"), lambda c: _probs_layout(c.raw("attn.probs", "bwd")))
VECTOR_PARTS["x"] = Part(_at(_vector_loc), lambda c: _vector(c))
VECTOR_PARTS["dx"] = Part(_at(_vector_loc, "bwd"), lambda c: _vector(c, "bwd"))

# LLM-TT proximity shares, computed by executor/contrib.py in its own forward pass
CONTRIBUTION_KINDS = ("attn", "head", "mlp")

# scalars that are defined only on some kinds: the kinds a query gets when it names no component
HOME_KINDS = {"token_attribution": ("embed",), "sae_error": tuple(ERROR_KINDS)}
