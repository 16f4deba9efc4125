"""Scalar derivers: how each scalar of the catalog (query/catalog.py) is computed on each component.

A deriver names the raw tensors it needs (`Raw`: hook location, layer, forward or backward) and
computes, from those tensors, one value per node in a canonical layout with named dimensions

    (batch, token, key, unit)      -- `key` is the attended token for `attn`, size 1 otherwise;
                                      `unit` is the neuron, head or latent (size 1 for vectors)

Derivers are built from a few shared parts per node kind (act, grad, the unit write vector and
g, the gradient at the residual the objective reads), so `act_times_grad` is "act × grad" for
every kind, `direct_effect` is "act × (unit write · g)" and so on; there is no enum of combined
names. `RECIPES` holds one entry per catalog scalar; `DERIVERS` applies it to every component the
catalog says the scalar is defined for (a test holds each to the parts it needs). The planner
takes the union of `needs` over the derivers of a query and installs only those hooks.

Node kinds (the `component` column):
- `mlp` (t, n): a = mlp.post; unit write = W_out[n].
- `attn` (t, u, h): A = attn.probs; unit write = v[u] W_O[h].
- `head` (t, h): attention summed over keys u (act = Σ_u A, 1 unless ablated); write_norm is the
  norm of the summed write ‖z[t,h] W_O[h]‖ (TDB's per-sequence-token write norm).
- `mlp_sae` / `attn_sae` / `resid_sae` (t, i): z = the latent; unit write = decoder row in the
  residual basis (W_dec @ W_out for the mlp site).
- vector nodes, one per token: `embed` (the token + position embedding x) and
  `<site>_sae_error` (the autoencoder's reconstruction error e). TDB's convention: act = 1,
  grad = act_times_grad = x·∂L/∂x, write_norm = ‖write‖, direct_effect = write·g.
  `token_attribution` is `embed`'s act_times_grad; `sae_error` is ‖e‖ on error rows.

`attrib_patch` (attribution patching) works on prompt pairs: the engine passes each batch as
consecutive (clean, corrupted) rows — each prompt and its `corrupt` version, or, without those,
prompts 0 and 1, 2 and 3, ... in the order given — both of a pair with the same number of tokens. The value, reported on the clean prompt's rows, is
(act_clean − act_corrupt) · grad_corrupt (for vector nodes (x_clean − x_corrupt)·∂L/∂x_corrupt),
where grad_corrupt is the gradient of the corrupted prompt's own loss. Corrupted prompts give
no rows.

`in_edge` needs a trace of a node X and is the weight of the edge between every node and X:
for a node N upstream of X it is N's write · ∂pre_X/∂(residual X reads) (gradient, many → one;
equal to direct_effect under the same trace); for a node M downstream of X it is the
forward-mode derivative (JVP) of M's pre-activation along X's write, through the residual stream
only (one → many; every layer-norm scale frozen). Nodes neither side give 0. Defined for mlp,
attn, latents and embeddings (always upstream).

Post-norm families: a unit write at t is divided by the post-norm's scale (docs/scalars.md).
`contribution` is LLM-TT's proximity share (docs/routes.md), computed by executor/contrib.py's
capture inside the same forward pass and read here from the locations `contrib.attn` and
`contrib.mlp`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from einops import rearrange

from ..query.catalog import COMPONENTS, SCALARS
from .keys import causal_sum

Pass = Literal["fwd", "bwd", "jvp"]

VECTOR_KINDS = tuple(c.name for c in COMPONENTS.values() if c.unit is None)  # one node per token


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
    write_scales: tuple[str, ...] = ()  # what divides a unit write: a post-norm's, a normalising SAE's scale

    @property
    def sae_site(self) -> str | None:
        return COMPONENTS[self.kind].site


class Context:
    """Evaluation of parts for one site and one batch: raw tensors, weights, memoised parts."""

    def __init__(self, site: Site, raw: Callable[[Raw], torch.Tensor], weights: Weights) -> None:
        self.site, self._raw, self.weights = site, raw, weights
        self._memo: dict[str, torch.Tensor] = {}

    def raw(self, location: str, pass_: Pass = "fwd") -> torch.Tensor:
        return self._raw(Raw(location, self.site.layer, pass_))

    def g(self) -> torch.Tensor:  # (batch, token, d_model)
        return self._raw(self.site.g)

    def per_write(self, vector: bool = False) -> torch.Tensor | float:
        """What a unit write is multiplied by at each token: 1 / the post-norm's scale, (batch,
        token, 1, 1) or for `vector` (batch, token, 1), in post-norm families; else 1."""
        if not self.site.write_scales:
            return 1.0
        inverse = 1.0 / torch.stack([self.raw(loc) for loc in self.site.write_scales]).prod(0)
        return inverse if vector else inverse[..., None]

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


def _scaled(needs: Callable[[Site], frozenset[Raw]]) -> Callable[[Site], frozenset[Raw]]:
    """`needs` plus the post-norm scale a write is divided by, where the site has one."""
    return lambda s: needs(s) | {Raw(loc, s.layer) for loc in s.write_scales}


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
        return ctx.part("act") * read[:, :, None, :] * ctx.per_write()

    return _zeros_unless_upstream(ctx, compute, "act")


MLP_PARTS = {
    "act": Part(_fixed("mlp.post"), lambda c: c.raw("mlp.post")[:, :, None, :]),
    "grad": Part(_fixed("mlp.post", "bwd"), lambda c: c.raw("mlp.post", "bwd")[:, :, None, :]),
    "write_norm": Part(_scaled(_none),
                       lambda c: c.part("act") * c.weights.W_out(c.site.layer).norm(dim=-1) * c.per_write(), ("act",)),
    "direct_effect": Part(_scaled(_g_need()), _mlp_direct, ("act",)),
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
    return ctx.part("act") * write.norm(dim=-1)[:, None, :, :] * ctx.per_write()  # A · ‖v[u] W_O[h]‖ (/ s[t])


def _attn_direct(ctx: Context) -> torch.Tensor:
    def compute():
        g_read = torch.einsum("btd,hed->bthe", ctx.g(), ctx.weights.W_O(ctx.site.layer))
        return ctx.part("act") * torch.einsum("buhe,bthe->btuh", _value_heads(ctx), g_read) * ctx.per_write()

    return _zeros_unless_upstream(ctx, compute, "act")


def _probs_layout(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b h t u -> b t u h")


ATTN_PARTS = {
    "act": Part(_fixed("attn.probs"), lambda c: _probs_layout(c.raw("attn.probs"))),
    "grad": Part(_fixed("attn.probs", "bwd"), lambda c: _probs_layout(c.raw("attn.probs", "bwd"))),
    "write_norm": Part(_scaled(_fixed("attn.v")), _attn_write_norm, ("act",)),
    "direct_effect": Part(_scaled(_g_need(_fixed("attn.v"))), _attn_direct, ("act",)),
    "jvp_pre": Part(_fixed("attn.logits", "jvp"), lambda c: _probs_layout(c.raw("attn.logits", "jvp"))),
}


# Heads: attention summed over keys u <= t -> (batch, token, 1, head)
def _sum_keys(c: Context, part: str) -> torch.Tensor:
    return causal_sum(_probs_layout(c.raw("attn.probs", "bwd" if part == "grad" else "fwd")))


def _head_write(ctx: Context) -> torch.Tensor:  # (batch, token, head, d_model)
    return torch.einsum("bthe,hed->bthd", ctx.raw("attn.z"), ctx.weights.W_O(ctx.site.layer)) * ctx.per_write()


def _head_direct(ctx: Context) -> torch.Tensor:
    def compute():
        return torch.einsum("bthd,btd->bth", _head_write(ctx), ctx.g())[:, :, None, :]

    return _zeros_unless_upstream(ctx, compute, "write_norm")


def _head_times_grad(ctx: Context) -> torch.Tensor:
    probs = _probs_layout(ctx.raw("attn.probs"))
    return causal_sum(probs * _probs_layout(ctx.raw("attn.probs", "bwd")))


HEAD_PARTS = {
    "act": Part(_fixed("attn.probs"), lambda c: _sum_keys(c, "act")),
    "grad": Part(_fixed("attn.probs", "bwd"), lambda c: _sum_keys(c, "grad")),
    "act_times_grad": Part(
        lambda s: frozenset({Raw("attn.probs", s.layer), Raw("attn.probs", s.layer, "bwd")}), _head_times_grad
    ),
    "write_norm": Part(_scaled(_fixed("attn.z")), lambda c: _head_write(c).norm(dim=-1)[:, :, None, :]),
    "direct_effect": Part(_scaled(_g_need(_fixed("attn.z"))), _head_direct, ("write_norm",)),
}


# Autoencoder latents: (batch, token, latent) -> (batch, token, 1, latent)
def _sae_direct(ctx: Context) -> torch.Tensor:
    def compute():
        decoder = ctx.weights.decoder(ctx.site.sae_site, ctx.site.layer)
        return ctx.part("act") * torch.einsum("btd,id->bti", ctx.g(), decoder)[:, :, None, :] * ctx.per_write()

    return _zeros_unless_upstream(ctx, compute, "act")


def _sae_write_norm(ctx: Context) -> torch.Tensor:
    return ctx.part("act") * ctx.weights.decoder(ctx.site.sae_site, ctx.site.layer).norm(dim=-1) * ctx.per_write()


def _sae_jvp_pre(ctx: Context) -> torch.Tensor:
    """Tangent of the encoder pre-activation: (tangent of the input, normalised if so) @ W_enc."""
    ae = ctx.weights.saes[(ctx.site.sae_site, ctx.site.layer)]
    location = SAE_INPUT[ctx.site.sae_site]
    return ae.pre_activation_tangent(ctx.raw(location), ctx.raw(location, "jvp"))[:, :, None, :]


SAE_INPUT = {"mlp": "mlp.post", "attn": "attn.out", "resid": "resid.post", "mlp_tc": "mlp.in"}

SAE_PARTS = {
    "act": Part(_at(_latent_loc), lambda c: c.raw(_latent_loc(c.site))[:, :, None, :]),
    "grad": Part(_at(_latent_loc, "bwd"), lambda c: c.raw(_latent_loc(c.site), "bwd")[:, :, None, :]),
    "write_norm": Part(_scaled(_none), _sae_write_norm, ("act",)),
    "direct_effect": Part(_scaled(_g_need()), _sae_direct, ("act",)),
    "jvp_pre": Part(lambda s: frozenset(Raw(SAE_INPUT[s.sae_site], s.layer, p) for p in ("fwd", "jvp")), _sae_jvp_pre),
}


# Vector nodes (embedding, autoencoder error): one per token -> (batch, token, 1, 1)
def _vector_loc(s: Site) -> str:
    return "resid.embed" if s.kind == "embed" else _error_loc(s)


def _vector(ctx: Context, pass_: Pass = "fwd") -> torch.Tensor:
    return ctx.raw(_vector_loc(ctx.site), pass_)


def _vector_write(ctx: Context) -> torch.Tensor:  # (batch, token, d_model)
    x = _vector(ctx)
    if ctx.site.kind == "embed":
        return x
    return ctx.weights.to_resid(ctx.site.sae_site, ctx.site.layer, x) * ctx.per_write(vector=True)


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
    "write_norm": Part(_scaled(_at(_vector_loc)), lambda c: _per_token(_vector_write(c).norm(dim=-1))),
    "direct_effect": Part(_scaled(_g_need(_at(_vector_loc))), _vector_direct, ("act",)),
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
    if kind in VECTOR_KINDS:
        return "vector"
    return "sae" if COMPONENTS[kind].unit == "latent" else kind


# --- contribution: LLM-TT's proximity shares, captured during the forward pass -------------------------

# The pass fills these locations from executor/contrib.py's capture (they are not hook points):
# contrib.attn (batch, token, key, head) per (query, key, head) share of resid.mid; contrib.mlp
# (batch, token, 1, neuron) per neuron share of resid.post.
CONTRIBUTION_LOCATIONS = ("contrib.attn", "contrib.mlp")

MLP_PARTS["contribution"] = Part(_fixed("contrib.mlp"), lambda c: c.raw("contrib.mlp"))
ATTN_PARTS["contribution"] = Part(_fixed("contrib.attn"), lambda c: c.raw("contrib.attn"))
HEAD_PARTS["contribution"] = Part(_fixed("contrib.attn"), lambda c: causal_sum(c.raw("contrib.attn")))

# raw per-key tensors for the head's pair scalar; raw vectors for vector nodes' pair scalar
HEAD_PARTS["act_keys"] = Part(_fixed("attn.probs"), lambda c: _probs_layout(c.raw("attn.probs")))
HEAD_PARTS["grad_keys"] = Part(_fixed("attn.probs", "bwd"), lambda c: _probs_layout(c.raw("attn.probs", "bwd")))
VECTOR_PARTS["x"] = Part(_at(_vector_loc), lambda c: _vector(c))
VECTOR_PARTS["dx"] = Part(_at(_vector_loc, "bwd"), lambda c: _vector(c, "bwd"))


# --- derivers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deriver:
    """One scalar on one node kind: the parts it combines and how. `downstream` is the deriver
    for nodes downstream of a traced node, where that differs (in_edge: a forward-mode JVP)."""

    scalar: str
    parts: tuple[str, ...]
    combine: Callable[..., torch.Tensor] = field(default=lambda x: x)
    pair: bool = False  # computes across (clean, corrupted) prompt pairs
    downstream: Deriver | None = None

    def needs(self, site: Site) -> frozenset[Raw]:
        table = PARTS[_family(site.kind)]
        out: set[Raw] = set()
        pending = list(self.parts)
        while pending:
            part = table[pending.pop()]
            out |= part.needs(site)
            pending.extend(part.uses)
        return frozenset(out)

    def missing_parts(self, kind: str) -> list[str]:
        """Parts this deriver (and its downstream variant) uses that `kind`'s family lacks."""
        table = PARTS[_family(kind)]
        pending, missing = list(self.parts), []
        while pending:
            name = pending.pop()
            if name not in table:
                missing.append(name)
            else:
                pending.extend(table[name].uses)
        return missing + (self.downstream.missing_parts(kind) if self.downstream else [])

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


def _same_part(scalar: str) -> Callable[[str], Deriver]:
    return lambda kind: Deriver(scalar, (scalar,))


def _act_times_grad(kind: str) -> Deriver:
    if "act_times_grad" in PARTS[_family(kind)]:  # heads and vector nodes have their own
        return Deriver("act_times_grad", ("act_times_grad",))
    return Deriver("act_times_grad", ("act", "grad"), _product)


def _in_edge(kind: str) -> Deriver:
    """Upstream of the trace: the direct effect on it; downstream: the JVP of the pre-activation
    along the traced node's write (embeddings are never downstream)."""
    below = None if kind == "embed" else Deriver("in_edge", ("jvp_pre",))
    return Deriver("in_edge", ("direct_effect",), downstream=below)


def _attrib_patch_deriver(kind: str) -> Deriver:
    if kind in VECTOR_KINDS:
        return Deriver("attrib_patch", ("x", "dx"), _vector_patch, pair=True)
    if kind == "head":
        return Deriver("attrib_patch", ("act_keys", "grad_keys"), lambda a, g: causal_sum(_attrib_patch(a, g)),
                       pair=True)
    return Deriver("attrib_patch", ("act", "grad"), _attrib_patch, pair=True)


# How each catalog scalar is derived on a component (query/catalog.py says which components)
RECIPES: dict[str, Callable[[str], Deriver]] = {
    "act": _same_part("act"),
    "grad": _same_part("grad"),
    "act_times_grad": _act_times_grad,
    "write_norm": _same_part("write_norm"),
    "direct_effect": _same_part("direct_effect"),
    "contribution": _same_part("contribution"),
    "token_attribution": lambda kind: Deriver("token_attribution", ("act_times_grad",)),
    "sae_error": lambda kind: Deriver("sae_error", ("norm",)),
    "in_edge": _in_edge,
    "attrib_patch": _attrib_patch_deriver,
}

DERIVERS: dict[tuple[str, str], Deriver] = {
    (name, kind): RECIPES[name](kind) for name, scalar in SCALARS.items() for kind in scalar.applies_to
}


def deriver(scalar: str, kind: str, *, downstream: bool = False) -> Deriver | None:
    """The deriver of `scalar` on `kind` (its downstream-of-trace variant when asked), or None
    where the catalog does not define the scalar for the kind."""
    found = DERIVERS.get((scalar, kind))
    if found is not None and downstream and found.downstream is not None:
        return found.downstream
    return found
