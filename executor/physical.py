"""Physical planning: a bound node query -> a frozen `NodePlan`, with no tensor work.

    plan = plan_node_query(bound, cfg, saes=loaded.saes, freeze_ln_f=True)

The plan says which (component, layer) blocks are derived and by which derivers, which raw
tensors the passes capture (forward values, gradients, forward-mode tangents), where the gradient
g is read (the residual the objective reads: before ln_f, or a traced node's input), where
autograd starts recording, which hooks ablate and detach. The binder has checked every name and
range already (query/bind.py); nothing here validates.

Residual-stream order: every node writes into the residual stream at one place and reads it at
another. With 3 slots per layer (attention, MLP, residual autoencoder), `write_order` and
`read_order` decide whether a node writes strictly upstream of the residual g is read at (its
direct effect is 0 otherwise, as in TDB), and whether a node is downstream of a traced node (its
`in_edge` comes from the forward-mode pass).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

from ..query.catalog import COMPONENTS
from ..query.plan import BoundQuery, Loss, NodeQuery, NodeRef, Trace
from .ablation import AblationSpec, ablation_spec, needs_means
from .conditions import static_conditions_pass, token_conditions_relative
from .interventions import PatchSpec, patch_specs
from .scalars import SAE_INPUT, Deriver, Raw, Site, deriver

# --- ordering of writes and reads along the residual stream ----------------------------------------


def write_order(kind: str, layer: int | None) -> float:
    """Where a node kind adds its write to the residual stream (embed first)."""
    if kind == "embed":
        return -1.0
    site = COMPONENTS[kind].site
    if kind in ("attn", "head") or site == "attn":
        return 3.0 * layer
    if kind == "mlp" or site in ("mlp", "mlp_tc"):
        return 3.0 * layer + 1
    return 3.0 * layer + 2  # resid_sae, resid_sae_error


READ_OFFSET = {"resid.pre": -0.5, "resid.mid": 0.5, "resid.post": 1.5, "sae.resid.error": 1.5}


def read_order(raw: Raw | None) -> float:
    if raw is None or raw.layer is None:
        return math.inf
    if raw.location == "sae.resid.error":  # the final residual when the last layer has a resid SAE
        return math.inf
    return 3.0 * raw.layer + READ_OFFSET[raw.location]


def node_read_order(kind: str, layer: int, parallel: bool) -> float:
    """Where a node's pre-activation reads the residual stream."""
    if kind in ("attn", "attn_sae"):
        return 3.0 * layer - 0.5
    if kind in ("mlp", "mlp_sae", "mlp_tc"):
        return 3.0 * layer + (-0.5 if parallel else 0.5)
    return 3.0 * layer + 1.5  # resid_sae


LOCATION_ORDER = [
    "resid.pre", "ln1.scale", "q_norm.scale", "k_norm.scale", "attn.q", "attn.k", "attn.v", "attn.logits",
    "attn.probs", "attn.z", "ln1_post.scale", "attn.out", "sae.attn.latent", "sae.attn.error", "resid.mid",
    "ln2.scale", "mlp.in", "mlp.pre", "mlp.post", "sae.mlp.scale", "sae.mlp.latent", "sae.mlp.error", "ln2_post.scale",
    "sae.mlp_tc.latent", "sae.mlp_tc.error", "mlp.out", "resid.post", "sae.resid.scale", "sae.resid.latent",
    "sae.resid.error",
]
LOCATION_ORDER.insert(LOCATION_ORDER.index("sae.attn.latent"), "sae.attn.scale")


def write_scale(kind: str, cfg) -> str | None:
    """The post-norm scale that divides a node kind's writes (post-norm families), else None."""
    if not getattr(cfg, "post_norms", False) or kind == "embed":
        return None
    site = COMPONENTS[kind].site
    if kind in ("attn", "head"):
        return "ln1_post.scale"
    return "ln2_post.scale" if kind == "mlp" or site == "mlp" else None


def write_scales(kind: str, layer: int | None, cfg, saes) -> tuple[str, ...]:
    """Every scale dividing a node kind's unit writes: the post-norm's, and for the latents of an
    autoencoder that normalises its input, its output divisor (`saes`: (site, layer) ->
    autoencoder, or just the keys)."""
    post = write_scale(kind, cfg)
    site = COMPONENTS[kind].site if kind != "embed" else None
    ae = saes.get((site, layer)) if isinstance(saes, Mapping) else None
    normalised = COMPONENTS[kind].unit == "latent" and getattr(ae, "normalize", "none") != "none" and not ae.transcoder
    return (*([post] if post else []), *([f"sae.{site}.scale"] if normalised else []))


def location_rank(raw: Raw) -> tuple[float, int]:
    if raw.location == "resid.embed":
        return (-1.0, 0)
    if raw.layer is None:
        return (math.inf, 0)
    return (float(raw.layer), LOCATION_ORDER.index(raw.location))


# --- the plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceSpec:
    """The traced node: its objective location (captured with autograd), read residual, detaches.

    `via="v"` (attention only) traces A[t,u,h]·(v[u,h] W_O[h])·stopgrad(g_down[t]) instead of
    the QK logit; `inputs` are the other live tensors that objective reads."""

    kind: str
    layer: int
    index: int
    token: int
    key: int | None
    objective: Raw  # mlp.pre / attn.logits / the SAE's input
    read: Raw  # gradient location for direct effects ("g")
    detach: tuple[tuple[str, int], ...]  # hook locations returning x.detach()
    write: str  # hook location where the node's write enters (for the JVP pass)
    via: str | None = None  # attention: "q" | "k" | "qk" (the logit) or "v" (the value path)
    inputs: tuple[Raw, ...] = ()  # more tensors the objective reads, captured with autograd

    @property
    def needs_loss(self) -> bool:
        """A V trace weighs the head's write by g_down, the loss gradient after the layer."""
        return self.via == "v"


@dataclass(frozen=True)
class SitePlan:
    """One (component, layer) block: where it is evaluated and the deriver of each scalar (None
    where the scalar is not defined for the component: its column is NULL there)."""

    site: Site
    derivers: tuple[tuple[str, Deriver | None], ...]

    def deriver(self, scalar: str) -> Deriver | None:
        return dict(self.derivers).get(scalar)


@dataclass(frozen=True)
class NodePlan:
    query: NodeQuery
    loss: Loss | None
    scalars: tuple[str, ...]  # output columns; the first ranks
    sites: tuple[SitePlan, ...]
    raws: frozenset[Raw]
    g: Raw | None
    trace: TraceSpec | None
    ablations: tuple[AblationSpec, ...]
    freeze_ln_f: bool
    pairs: bool  # prompts read as (clean, corrupted) pairs
    grad_entry: Raw | None  # where autograd starts recording (below the lowest gradient)
    relative_positions: bool  # over-prompts positions counted from the end
    contribution_norm: int = 1
    patch: tuple[PatchSpec, ...] = ()  # activations taken from the other prompt of each pair

    @property
    def needs_backward(self) -> bool:
        return any(r.pass_ == "bwd" for r in self.raws)

    @property
    def needs_jvp(self) -> bool:
        return any(r.pass_ == "jvp" for r in self.raws)

    @property
    def mean_pass(self) -> bool:
        return needs_means(self.ablations)

    @property
    def loss_backward(self) -> bool:
        """Whether the backward starts at the loss (so the logits get a gradient)."""
        return self.needs_backward and (self.trace is None or self.trace.needs_loss)

    @property
    def eager_layers(self) -> frozenset[int]:
        """Layers whose attention runs eagerly (something reads the probabilities or logits)."""
        return frozenset(r.layer for r in self.raws if r.location in ("attn.logits", "attn.probs", "contrib.attn"))

    def captured(self) -> list[Raw]:
        """Forward values the pass keeps (also where only the gradient is wanted), in order."""
        return sorted({Raw(r.location, r.layer) for r in self.raws if r.pass_ != "jvp"})


def plan_node_query(bound: BoundQuery, cfg, *, saes: Collection[tuple[str, int]], freeze_ln_f: bool) -> NodePlan:
    """The physical plan of a bound node query on a model of config `cfg` with autoencoders at
    `saes` ((site, layer) pairs)."""
    query: NodeQuery = bound.query
    scalars = tuple(s.name for s in query.scalars)
    trace = trace_spec(query.trace, cfg, saes) if query.trace else None
    g = trace.read if trace else final_residual(cfg, saes)
    sites = tuple(_sites(query, scalars, g, trace, cfg, saes))
    raws = frozenset().union(*(d.needs(p.site) for p in sites for _, d in p.derivers if d is not None))
    if trace is not None and any(r.pass_ == "bwd" for r in raws):
        raws = raws | {trace.objective, *trace.inputs}
    contribution = next((s for s in query.scalars if s.name == "contribution"), None)
    return NodePlan(
        query=query,
        loss=bound.loss,
        scalars=scalars,
        sites=sites,
        raws=raws,
        g=g,
        trace=trace,
        ablations=tuple(ablation_spec(a) for a in query.ablations),
        freeze_ln_f=freeze_ln_f,
        pairs=any(d is not None and d.pair for p in sites for _, d in p.derivers),
        grad_entry=_grad_entry(raws, trace),
        relative_positions=token_conditions_relative(query.where),
        contribution_norm=int(contribution.param("norm", 1)) if contribution else 1,
        patch=patch_specs(query.patch),
    )


def _sites(query: NodeQuery, scalars: tuple[str, ...], g: Raw, trace: TraceSpec | None, cfg,
           saes: Collection[tuple[str, int]]) -> Iterator[SitePlan]:
    for kind in query.components:
        for layer in _layers(kind, cfg, saes):
            if not static_conditions_pass(query.where, kind, layer):
                continue
            downstream = trace is not None and _downstream(kind, layer, trace, cfg.parallel_residual)
            site = Site(kind, layer, g=g, upstream=write_order(kind, layer) < read_order(g),
                        write_scales=write_scales(kind, layer, cfg, saes))
            derivers = tuple((s, deriver(s, kind, downstream=downstream)) for s in scalars)
            if derivers[0][1] is None and (query.mode != "select" or all(d is None for _, d in derivers)):
                continue  # the ranking scalar is not defined here (select: no scalar is)
            yield SitePlan(site, derivers)


def _layers(kind: str, cfg, saes: Collection[tuple[str, int]]) -> list[int | None]:
    if kind == "embed":
        return [None]
    site = COMPONENTS[kind].site
    if site is not None:
        return sorted(layer for s, layer in saes if s == site)
    return list(range(cfg.n_layers))


def _downstream(kind: str, layer: int | None, trace: TraceSpec, parallel: bool) -> bool:
    if layer is None or kind not in ("mlp", "attn") and COMPONENTS[kind].unit != "latent":
        return False
    return node_read_order(kind, layer, parallel) > write_order(trace.kind, trace.layer)


def final_residual(cfg, saes: Collection[tuple[str, int]]) -> Raw:
    last = cfg.n_layers - 1
    if ("resid", last) in saes:
        return Raw("sae.resid.error", last, "bwd")  # the spliced residual ln_f reads
    return Raw("resid.post", last, "bwd")


def trace_spec(trace: Trace, cfg, saes: Collection[tuple[str, int]]) -> TraceSpec:
    """Where a bound trace's objective lives, the residual it reads and what it detaches."""
    node: NodeRef = trace.node
    L = node.layer
    mlp_read = Raw("resid.pre" if cfg.parallel_residual else "resid.mid", L, "bwd")
    if node.component == "mlp":
        return TraceSpec("mlp", L, node.index, node.token, None, Raw("mlp.pre", L), mlp_read, (("ln2.scale", L),),
                         "mlp.out")
    if node.component == "attn":
        if trace.via == "v":
            post = write_scale("attn", cfg)  # the head's write is divided by the post-norm's scale
            return TraceSpec("attn", L, node.index, node.token, node.key, Raw("attn.v", L), Raw("resid.pre", L, "bwd"),
                             (("ln1.scale", L), ("attn.q", L), ("attn.k", L)), "attn.out", via="v",
                             inputs=(Raw("attn.probs", L), Raw("resid.mid", L), *([Raw(post, L)] if post else [])))
        qk_norms = [("q_norm.scale", L), ("k_norm.scale", L)] if getattr(cfg, "qk_norm", "none") != "none" else []
        detach = [("ln1.scale", L), *qk_norms] + {"q": [("attn.k", L)], "k": [("attn.q", L)]}.get(trace.via, [])
        return TraceSpec("attn", L, node.index, node.token, node.key, Raw("attn.logits", L),
                         Raw("resid.pre", L, "bwd"), tuple(detach), "attn.out", via=trace.via)
    site = COMPONENTS[node.component].site
    read = {"mlp": mlp_read, "mlp_tc": mlp_read, "attn": Raw("resid.pre", L, "bwd"),
            "resid": Raw("resid.post", L, "bwd")}[site]
    detach = {"mlp": (("ln2.scale", L),), "mlp_tc": (("ln2.scale", L),), "attn": (("ln1.scale", L),), "resid": ()}[site]
    write = {"mlp": "mlp.out", "mlp_tc": "mlp.out", "attn": "attn.out", "resid": "resid.post"}[site]
    return TraceSpec(node.component, L, node.index, node.token, None, Raw(SAE_INPUT[site], L), read, detach, write)


def _grad_entry(raws: frozenset[Raw], trace: TraceSpec | None) -> Raw | None:
    """The residual location where autograd starts recording: below the lowest gradient."""
    bwd = [r for r in raws if r.pass_ == "bwd"]
    if not bwd:
        return None
    if trace is not None and trace.needs_loss:  # g_down: a gradient at resid.mid of the layer
        bwd.append(Raw("resid.pre", trace.layer, "bwd"))
    lowest = min(bwd, key=location_rank)
    if lowest.location == "resid.embed" or lowest.layer is None:
        return Raw("resid.embed", None)
    return Raw("resid.pre", lowest.layer)
