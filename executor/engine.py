"""The engine: compile a query into passes over batches of prompts and reduce on the device.

    plan = engine.compile(query, prompts, loss)     # derivers, hooks, passes (no tensor work)
    engine.run(query, prompts, loss) -> {"result": pyarrow.Table}
    engine.explain(query, prompts, loss) -> str

A node query runs, per batch of right-padded prompts: (optionally, once before everything, a
forward pass over the prompt set to compute `=mean` ablation values), one forward pass with only
the hooks the plan needs, at most one backward pass (`torch.autograd.grad` on the summed
per-prompt objective: the loss, or a traced node's pre-activation; a trace `via v` first takes one
extra backward from the loss for g_down, see `_value_trace_objective`), and, for `in_edge` of nodes
downstream of a trace, one forward-mode (JVP) pass. Weights never take gradients; the first
location whose gradient is needed re-enters autograd with `x.detach().requires_grad_()`, so
nothing below it is recorded. Derivers turn the captured tensors into node values per
(kind, layer) block, the `where` conditions mask them, and a sink reduces them (running top-k,
dense rows, or sums over prompts).

Losses (per prompt, at its last real token): `logit_diff` = mean of the target logits − mean of
the distractor logits (just the target mean without distractors); `logprob` = mean of the
targets' log-probabilities. A PromptRow's own target / distractor replace the loss's lists.
The ln_f scale is frozen in the backward pass (`freeze_ln_f`, default on) so direct effects add
up to the loss exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from torch.autograd import forward_ad as fwAD

from .ablation import AblationSpec, ablation_means, add_ablations, needs_means
from .arrow import logit_table, node_table
from .runtime.batching import Batch, batches, check_pairs, encode_prompts, resolve_tokens
from .compiled import CompiledPasses
from .compiled import refusal as compiled_refusal
from .explain import raw_numel
from .runtime.hooks import HookSet
from .reduce import BatchMeta, Block, OverPromptsSink, SelectSink, TopKSink, concat_rows, lexsort, take
from .scalars import (
    ERROR_KINDS,
    HOME_KINDS,
    SAE_INPUT,
    SAE_KINDS,
    Context,
    Deriver,
    Raw,
    Site,
    Weights,
    deriver,
)
from ..query.plan import (
    DEFAULT_COMPONENTS,
    NODE_FIELDS,
    Ablation,
    Condition,
    LogitsQuery,
    Loss,
    NodeQuery,
    NodeRef,
    Range,
)
from ..query.context import PromptRow
from ..query.errors import TdbqlError

# --- ordering of writes and reads along the residual stream --------------------------------------


def write_order(kind: str, layer: int | None) -> float:
    """Where a node kind adds its write to the residual stream (embed first)."""
    if kind == "embed":
        return -1.0
    if kind in ("attn", "head", "attn_sae", "attn_sae_error"):
        return 3.0 * layer
    if kind in ("mlp", "mlp_sae", "mlp_sae_error"):
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
    if kind in ("mlp", "mlp_sae"):
        return 3.0 * layer + (-0.5 if parallel else 0.5)
    return 3.0 * layer + 1.5  # resid_sae


LOCATION_ORDER = [
    "resid.pre", "ln1.scale", "attn.q", "attn.k", "attn.v", "attn.logits", "attn.probs", "attn.z",
    "attn.out", "sae.attn.latent", "sae.attn.error", "resid.mid", "ln2.scale", "mlp.pre", "mlp.post",
    "sae.mlp.latent", "sae.mlp.error", "mlp.out", "resid.post", "sae.resid.latent", "sae.resid.error",
]


def location_rank(raw: Raw) -> tuple[float, int]:
    if raw.location == "resid.embed":
        return (-1.0, 0)
    if raw.layer is None:
        return (math.inf, 0)
    return (float(raw.layer), LOCATION_ORDER.index(raw.location))


# --- plan ------------------------------------------------------------------------------------------


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


@dataclass
class NodePlan:
    query: NodeQuery
    kinds: tuple[str, ...]
    scalars: tuple[str, ...]  # output columns
    computed: tuple[str, ...]  # output columns + scalars only `where` reads
    sites: list[tuple[Site, dict[str, Deriver | None]]]
    raws: frozenset[Raw]
    g: Raw | None
    trace: TraceSpec | None
    ablations: tuple[AblationSpec, ...]
    loss: Loss | None
    freeze_ln_f: bool
    pairs: bool
    grad_entry: Raw | None = None
    relative_positions: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def needs_backward(self) -> bool:
        return any(r.pass_ == "bwd" for r in self.raws)

    @property
    def needs_jvp(self) -> bool:
        return any(r.pass_ == "jvp" for r in self.raws)

    @property
    def mean_pass(self) -> bool:
        return needs_means(self.ablations)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of a query's batches (`Engine.estimate_memory` lists what is counted)."""

    weights: int  # model and autoencoder parameters, bytes
    per_prompt: int  # bytes one prompt adds to a batch
    n_tokens: int  # real tokens of the longest prompt (the padded width)
    parts: dict[str, int]  # per-prompt bytes: saved, logits, captured, grads, working, reduction

    def peak(self, batch_size: int) -> int:
        return self.weights + batch_size * self.per_prompt


def _loss_backward(plan: NodePlan | None) -> bool:
    """Whether the backward starts at the loss (so the logits get a gradient)."""
    return plan is not None and plan.needs_backward and (plan.trace is None or plan.trace.needs_loss)


# --- engine --------------------------------------------------------------------------------------------


class Engine:
    def __init__(
        self,
        loaded,
        *,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        freeze_ln_f: bool = True,
        memory_budget: int | None = None,
        compile: bool = False,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.cfg = loaded.config
        self.batch_size = batch_size
        self.progress = progress
        self.freeze_ln_f = freeze_ln_f
        self.memory_budget = memory_budget
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights = Weights(self.model, loaded.saes)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.compiled = CompiledPasses(self) if compile else None

    # -- entry points --

    def run(self, query, prompts: Sequence[PromptRow], loss: Loss | None = None) -> dict[str, pa.Table]:
        visit = getattr(self, f"visit_{type(query).__name__}", None)
        if visit is None:
            raise TdbqlError(f"the engine cannot run a {type(query).__name__}")
        if not prompts:
            raise TdbqlError("no prompts: add one with `prompt \"...\"` or `prompts from ...`")
        with self._intra_op_threads(prompts):
            return visit(query, prompts, loss)

    def _intra_op_threads(self, prompts: Sequence[PromptRow]):
        """One CPU thread for small batches (a REPL query on a small model): their matmuls are
        microseconds, and a parallel region waits for every thread, so on a loaded machine each
        op can stall for a scheduler slice (measured: a 4-layer d_model-128 query took 1.35 s with
        2 threads on 2 contended cores, 37 ms with one). Large batches keep torch's setting."""
        if self.loaded.device.type != "cpu" or torch.get_num_threads() == 1:
            return contextlib.nullcontext()
        if self._batch_work(prompts) > SMALL_BATCH_WORK:
            return contextlib.nullcontext()
        return _threads(1)

    def _batch_work(self, prompts: Sequence[PromptRow]) -> int:
        """Prompts per batch x the longest of the first batch's prompts (in tokens) x parameters
        (model and autoencoders): roughly one batch's forward multiply-adds."""
        per_batch = min(len(prompts), self.batch_size or 64)
        longest = max(len(self.loaded.encode(p.text)) for p in prompts[:per_batch])
        sae_params = sum(p.numel() for ae in self.loaded.saes.values() for p in ae.parameters())
        return per_batch * longest * (self.n_params + sae_params)

    def explain(self, query, prompts: Sequence[PromptRow], loss: Loss | None = None) -> str:
        from .explain import explain_plan

        if isinstance(query, NodeQuery):
            plan = self.compile(query, prompts, loss)
            return explain_plan(self, plan, prompts)
        return f"{type(query).__name__}: one forward pass per batch of prompts, no backward pass"

    # -- compile --

    def compile(self, query: NodeQuery, prompts: Sequence[PromptRow], loss: Loss | None) -> NodePlan:
        loss = query.target or loss
        scalars = tuple(s.name for s in query.scalars)
        if not scalars:
            raise TdbqlError("a node query needs at least one scalar")
        where_scalars = tuple(c.field for c in query.where if c.field not in NODE_FIELDS and c.field not in scalars)
        computed = scalars + tuple(dict.fromkeys(where_scalars))
        kinds = self._kinds(query, computed)
        trace = self._trace(query.trace) if query.trace else None
        g = trace.read if trace else self._final_residual()
        if "in_edge" in computed and trace is None:
            raise TdbqlError("in_edge needs a traced node: add `trace mlp[L,N]@t` (or attn/sae)")
        sites = self._sites(kinds, computed, query, g, trace)
        raws = frozenset().union(*(d.needs(s) for s, ds in sites for d in ds.values() if d is not None))
        plan = NodePlan(
            query=query,
            kinds=kinds,
            scalars=scalars,
            computed=computed,
            sites=sites,
            raws=raws,
            g=g,
            trace=trace,
            ablations=tuple(self._ablation(a) for a in query.ablations),
            loss=loss,
            freeze_ln_f=self.freeze_ln_f,
            pairs="attrib_patch" in computed,
        )
        if trace is not None and plan.needs_backward:
            plan.raws = plan.raws | {trace.objective, *trace.inputs}
        plan.grad_entry = self._grad_entry(plan)
        plan.relative_positions = _token_conditions_relative(query.where)
        self._check_plan(plan, prompts)
        return plan

    def _kinds(self, query: NodeQuery, scalars: tuple[str, ...]) -> tuple[str, ...]:
        sae_sites = sorted({site for site, _ in self.loaded.saes})
        if query.components:
            requested = list(query.components)
        else:
            requested = list(DEFAULT_COMPONENTS) + [f"{s}_sae" for s in sae_sites]
            for s in scalars:
                requested += [k for k in HOME_KINDS.get(s, ()) if k == "embed"]
        if "resid" in requested:
            raise TdbqlError("resid is not a node component; use mlp, attn, head, embed or an sae component")
        if "sae_error" in scalars:
            requested += [f"{k}_error" for k in requested if k in SAE_KINDS]
        for kind in requested:
            if kind in SAE_KINDS and SAE_KINDS[kind] not in sae_sites:
                raise TdbqlError(f"no autoencoder is loaded for {kind}: load one with `sae {SAE_KINDS[kind]} from ...`")
        return tuple(dict.fromkeys(requested))

    def _layers(self, kind: str) -> list[int | None]:
        if kind == "embed":
            return [None]
        site = SAE_KINDS.get(kind) or ERROR_KINDS.get(kind)
        if site is not None:
            return sorted(layer for s, layer in self.loaded.saes if s == site)
        return list(range(self.cfg.n_layers))

    def _sites(self, kinds, scalars, query, g, trace) -> list[tuple[Site, dict[str, Deriver | None]]]:
        sites = []
        for kind in kinds:
            for layer in self._layers(kind):
                if not _static_conditions_pass(query.where, kind, layer):
                    continue
                upstream = write_order(kind, layer) < read_order(g)
                downstream = trace is not None and self._downstream(kind, layer, trace)
                site = Site(kind, layer, g=g, upstream=upstream, jvp=downstream)
                ds = {s: deriver(s, kind, upstream_of_trace=not downstream) for s in scalars}
                if all(d is None for d in ds.values()) or (ds[scalars[0]] is None and query.mode != "select"):
                    continue  # the (ranking) scalar is not defined for this kind
                sites.append((site, ds))
        if not sites:
            raise TdbqlError(f"{scalars[0]} is not defined for {', '.join(kinds)} (or no layer passes the where clause)")
        return sites

    def _downstream(self, kind: str, layer: int | None, trace: TraceSpec) -> bool:
        if kind not in ("mlp", "attn", *SAE_KINDS) or layer is None:
            return False
        return node_read_order(kind, layer, self.cfg.parallel_residual) > write_order(trace.kind, trace.layer)

    def _final_residual(self) -> Raw:
        last = self.cfg.n_layers - 1
        if ("resid", last) in self.loaded.saes:
            return Raw("sae.resid.error", last, "bwd")  # the spliced residual ln_f reads
        return Raw("resid.post", last, "bwd")

    def _check_layer(self, layer: int, what: str) -> None:
        if not 0 <= layer < self.cfg.n_layers:
            raise TdbqlError(f"{what}: layer {layer} is out of range 0..{self.cfg.n_layers - 1}")

    def _trace(self, trace) -> TraceSpec:
        node: NodeRef = trace.node
        self._check_layer(node.layer, "trace")
        if node.token is None:
            raise TdbqlError(f"trace needs a token: {node.component}[{node.layer},{node.index}]@-1")
        if node.index is None:
            raise TdbqlError("trace needs a node with an index (mlp[L,N], attn[L,H]@t:u, sae[L,I])")
        L, parallel = node.layer, self.cfg.parallel_residual
        mlp_read = Raw("resid.pre" if parallel else "resid.mid", L, "bwd")
        if node.component == "mlp":
            self._check_index(node.index, self.cfg.d_mlp, "neuron")
            return TraceSpec("mlp", L, node.index, node.token, None, Raw("mlp.pre", L, "fwd"), mlp_read,
                             (("ln2.scale", L),), "mlp.out")
        if node.component == "attn":
            self._check_index(node.index, self.cfg.n_heads, "head")
            if trace.via == "v":
                return self._value_trace(node)
            if node.key is None:
                raise TdbqlError("trace of an attention head needs a key token: attn[L,H]@t:u")
            detach = [("ln1.scale", L)]
            if trace.via == "q":
                detach.append(("attn.k", L))
            elif trace.via == "k":
                detach.append(("attn.q", L))
            return TraceSpec("attn", L, node.index, node.token, node.key, Raw("attn.logits", L, "fwd"),
                             Raw("resid.pre", L, "bwd"), tuple(detach), "attn.out")
        if node.component in SAE_KINDS:
            site = SAE_KINDS[node.component]
            ae = self.loaded.saes.get((site, L))
            if ae is None:
                raise TdbqlError(f"no autoencoder at {site} layer {L} to trace")
            self._check_index(node.index, ae.n_latents, "latent")
            read = {"mlp": mlp_read, "attn": Raw("resid.pre", L, "bwd"), "resid": Raw("resid.post", L, "bwd")}[site]
            detach = {"mlp": (("ln2.scale", L),), "attn": (("ln1.scale", L),), "resid": ()}[site]
            write = {"mlp": "mlp.out", "attn": "attn.out", "resid": "resid.post"}[site]
            return TraceSpec(node.component, L, node.index, node.token, None, Raw(SAE_INPUT[site], L, "fwd"),
                             read, detach, write)
        raise TdbqlError(f"cannot trace {node.component}; trace mlp, attn or sae nodes")

    def _value_trace(self, node: NodeRef) -> TraceSpec:
        """`trace attn[L,H]@t[:u] via v`: only the V path stays attached (Q, K and the ln1 scale
        detached); the objective reads A and v of layer L and g_down at resid.mid of layer L."""
        L = node.layer
        return TraceSpec("attn", L, node.index, node.token, node.key, Raw("attn.v", L, "fwd"),
                         Raw("resid.pre", L, "bwd"), (("ln1.scale", L), ("attn.q", L), ("attn.k", L)),
                         "attn.out", via="v", inputs=(Raw("attn.probs", L), Raw("resid.mid", L)))

    def _check_index(self, index: int, size: int, what: str) -> None:
        if not 0 <= index < size:
            raise TdbqlError(f"{what} {index} is out of range 0..{size - 1}")

    def _ablation(self, ablation: Ablation) -> AblationSpec:
        node = ablation.node
        self._check_layer(node.layer, "ablate")
        value = ablation.value
        if node.component == "mlp":
            self._check_index(node.index, self.cfg.d_mlp, "neuron")
            return AblationSpec("mlp.post", node.layer, node.index, node.token, None, value, False)
        if node.component == "attn":
            self._check_index(node.index, self.cfg.n_heads, "head")
            return AblationSpec("attn.probs", node.layer, node.index, node.token, node.key, value, True)
        if node.component in SAE_KINDS:
            site = SAE_KINDS[node.component]
            ae = self.loaded.saes.get((site, node.layer))
            if ae is None:
                raise TdbqlError(f"no autoencoder at {site} layer {node.layer} to ablate")
            self._check_index(node.index, ae.n_latents, "latent")
            return AblationSpec(f"sae.{site}.latent", node.layer, node.index, node.token, None, value, False)
        raise TdbqlError(f"cannot ablate {node.component}; ablate mlp, attn or sae nodes")

    def _grad_entry(self, plan: NodePlan) -> Raw | None:
        """The residual location where autograd starts recording: below the lowest gradient."""
        bwd = [r for r in plan.raws if r.pass_ == "bwd"]
        if not bwd:
            return None
        if plan.trace is not None and plan.trace.needs_loss:  # g_down: a gradient at resid.mid of the layer
            bwd.append(Raw("resid.pre", plan.trace.layer, "bwd"))
        lowest = min(bwd, key=location_rank)
        if lowest.location == "resid.embed" or lowest.layer is None:
            return Raw("resid.embed", None)
        return Raw("resid.pre", lowest.layer)

    def _check_plan(self, plan: NodePlan, prompts: Sequence[PromptRow]) -> None:
        if plan.needs_backward and plan.trace is not None and plan.trace.needs_loss and plan.loss is None \
                and not all(p.target for p in prompts):
            t = plan.trace
            raise TdbqlError(f"trace attn[{t.layer},{t.index}] via v weighs the head's write by the loss gradient: "
                             "set a loss with `target \" Mary\" vs \" John\"`")
        if plan.needs_backward and plan.trace is None and plan.loss is None and not all(p.target for p in prompts):
            needing = [name for name in plan.computed if any(
                ds.get(name) is not None and any(r.pass_ == "bwd" for r in ds[name].needs(site))
                for site, ds in plan.sites)]
            raise TdbqlError(f"{', '.join(needing)} needs a loss: set one with `target \" Mary\" vs \" John\"`")
        if plan.pairs:
            check_pairs(prompts, encode_prompts(self.loaded, prompts))
        if plan.query.over_prompts and "prompt" in plan.query.by:
            raise TdbqlError("`by prompt` cannot be combined with `over prompts`")
        if plan.query.mode != "select" and not plan.query.k:
            raise TdbqlError(f"{plan.query.mode} needs a count, e.g. `{plan.query.mode} 20 ...`")

    # -- batching --

    def plan_batch_size(self, plan: NodePlan | None, prompts: Sequence[PromptRow]) -> int:
        """`batch_size` when given, else what the memory budget allows (at most 64); even for pairs.
        The budget is for the batch's tensors on top of the weights (already resident)."""
        if self.batch_size:
            size = max(1, self.batch_size)
        else:
            per_prompt = self.estimate_memory(plan, prompts).per_prompt
            budget = self.memory_budget or _default_budget(self.loaded.device)
            size = int(max(1, min(64, budget // max(per_prompt, 1))))
        return size + 1 if plan is not None and plan.pairs and size % 2 else size

    def estimate_bytes_per_prompt(self, plan: NodePlan | None, prompts: Sequence[PromptRow]) -> int:
        """Bytes one prompt adds to a batch (see `estimate_memory`)."""
        return self.estimate_memory(plan, prompts).per_prompt

    def estimate_memory(self, plan: NodePlan | None, prompts: Sequence[PromptRow]) -> MemoryEstimate:
        """Peak memory of one batch = weights + batch size x bytes per prompt, for the longest
        prompt (its real token count, T; every prompt of a batch is padded to the longest).

        Per prompt, counted in the model's dtype (fp32 for reduction buffers), elements per token:
        - saved: what autograd keeps for the backward pass, for each layer from the gradient entry
          layer up (the forward runs under autograd from there): per layer norm the centred
          input and the scale (d_model + 1); per attention either, eager, q, k and v as copies
          (3 n_heads d_head) plus the probabilities (n_heads T) and the bool mask (T bytes), or,
          fused SDPA, q, k, v, the output and the log-sum-exp ((n_heads + 2 n_kv_heads + 1) d_head
          + n_heads); per MLP the pre-activation (d_mlp; x3 for a gated MLP, whose gate output and
          up branch are saved too); per attached autoencoder 2 n_latents; ln_f as a layer norm.
          Weights are frozen, so linear layers save no inputs. Nothing when there is no backward.
        - logits: (T, vocab), alive through the backward; its gradient as large again when the
          objective is the loss (a traced pre-activation does not reach the logits).
        - captured: each hooked tensor the plan keeps (forward values, also where only the gradient
          is wanted, and jvp tangents), except the ones autograd already saves in recorded layers
          (mlp.pre, eager attn.probs, the norm scales).
        - grads: each gradient the backward returns, full size.
        - working: one layer's transient intermediates (attention logits and probabilities, the
          MLP's hidden activations); x2 for the JVP pass (dual tensors).
        - reduction: deriving one (kind, layer) block at a time after the passes: the largest
          block (token x key x unit) in fp32, per computed scalar plus its mask.
        Peak per prompt = max(passes: saved + logits + captured + grads + working,
        derivation: captured + grads + reduction). Ignored: the autograd graph's metadata,
        allocator fragmentation, and the saved tensors freed while the backward runs (so the
        figure is an upper bound on the tensors, not on the process's RSS).
        """
        T = max((len(ids) for ids in encode_prompts(self.loaded, prompts)), default=1)
        element = torch.finfo(self.loaded.dtype).bits // 8
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        weights += sum(p.numel() * p.element_size() for ae in self.loaded.saes.values() for p in ae.parameters())
        eager = self._eager_layers(plan)
        parts = {
            "saved": self._saved_numel(plan, T, eager) * element,
            # node passes unembed only each prompt's last token (run_passes); other queries all tokens
            "logits": (1 if plan is not None else T) * self.cfg.vocab_size * element * (2 if _loss_backward(plan) else 1),
            "captured": self._captured_numel(plan, T, eager) * element,
            "grads": sum(raw_numel(self, r, T) for r in plan.raws if r.pass_ == "bwd") * element if plan else 0,
            "working": self._working_numel(T, bool(eager)) * element * (2 if plan and plan.needs_jvp else 1),
            "reduction": self._reduction_numel(plan, T) * 4,
        }
        passes = parts["saved"] + parts["logits"] + parts["captured"] + parts["grads"] + parts["working"]
        derive = parts["captured"] + parts["grads"] + parts["reduction"]
        return MemoryEstimate(weights=weights, per_prompt=max(passes, derive), n_tokens=T, parts=parts)

    def _eager_layers(self, plan: NodePlan | None) -> set[int]:
        """Layers whose attention runs eagerly (a hook at attn.logits / attn.probs)."""
        if plan is None:
            return set()
        return {r.layer for r in plan.raws if r.location in ("attn.logits", "attn.probs")}

    def _recorded_layers(self, plan: NodePlan | None) -> range:
        """Layers whose forward autograd records: from the gradient entry up."""
        if plan is None or not plan.needs_backward or plan.grad_entry is None:
            return range(0)
        first = 0 if plan.grad_entry.layer is None else plan.grad_entry.layer
        return range(first, self.cfg.n_layers)

    def _saved_numel(self, plan: NodePlan | None, T: int, eager: set[int]) -> int:
        """Elements autograd saves for one prompt (see `estimate_memory`)."""
        c = self.cfg
        layers = self._recorded_layers(plan)
        if not layers:
            return 0
        norm = c.d_model + 1
        eager_attn = 3 * c.n_heads * c.d_head + c.n_heads * T + T // 8 + 1  # bool mask: T bytes
        fused_attn = (c.n_heads + 2 * c.n_kv_heads + 1) * c.d_head + c.n_heads
        mlp = c.d_mlp * (3 if c.gated_mlp else 1)
        per_token = norm  # ln_f
        for layer in layers:
            per_token += 2 * norm + mlp + (eager_attn if layer in eager else fused_attn)
            per_token += sum(2 * ae.n_latents for (_, l), ae in self.loaded.saes.items() if l == layer)
        return T * per_token

    def _captured_numel(self, plan: NodePlan | None, T: int, eager: set[int]) -> int:
        if plan is None:
            return 0
        recorded = set(self._recorded_layers(plan))
        kept = {Raw(r.location, r.layer) for r in plan.raws if r.pass_ != "jvp"}  # gradients read these too
        kept |= {r for r in plan.raws if r.pass_ == "jvp"}

        def saved_anyway(raw: Raw) -> bool:
            if raw.pass_ == "jvp" or raw.layer not in recorded:
                return False
            return raw.location in ("mlp.pre", "ln1.scale", "ln2.scale") or (
                raw.location == "attn.probs" and raw.layer in eager)

        return sum(raw_numel(self, r, T) for r in kept if not saved_anyway(r))

    def _working_numel(self, T: int, eager: bool) -> int:
        """One layer's transient intermediates for one prompt."""
        c = self.cfg
        attention = 2 * c.n_heads * T if eager else c.n_heads * c.d_head
        return T * (attention + 2 * c.d_mlp + 4 * c.d_model)

    def _reduction_numel(self, plan: NodePlan | None, T: int) -> int:
        if plan is None:
            return 0
        from .explain import block_numel

        largest = max(block_numel(self, site, T) for site, _ in plan.sites)
        return largest * (len(plan.computed) + 1)

    # -- node queries --

    def visit_NodeQuery(self, query: NodeQuery, prompts: list[PromptRow], loss: Loss | None) -> dict[str, pa.Table]:
        plan = self.compile(query, prompts, loss)
        batch_size = self.plan_batch_size(plan, prompts)
        means = ablation_means(self.loaded, plan.ablations, prompts, batch_size) if plan.mean_pass else {}
        sink = self._sink(plan)
        over = OverPromptsSink(query.over_prompts, plan.relative_positions) if query.over_prompts else None
        n_batches = math.ceil(len(prompts) / batch_size)
        for i, batch in enumerate(batches(self.loaded, prompts, max_prompts=batch_size, pairs=plan.pairs)):
            for block in self.node_blocks(plan, batch, means):
                if over is not None:
                    over.add(block, batch.lengths)
                else:
                    sink.add(block)
            if self.progress:
                self.progress(i + 1, n_batches)
        if over is not None:
            for block in over.finish():
                block.mask = _and(block.mask, _scalar_mask(query.where, block))
                sink.add(block)
        rows = sink.result()
        if rows is not None and "rank" in rows:
            rows = take(rows, lexsort([_group_order(rows, query.by), rows["rank"]]))
        return {"result": node_table(rows, plan.scalars, self.loaded.token_str)}

    def _sink(self, plan: NodePlan):
        q = plan.query
        if q.mode == "select":
            return SelectSink()
        return TopKSink(q.k, plan.scalars[0], bottom=q.mode == "bottomk", by=tuple(q.by))

    def node_blocks(self, plan: NodePlan, batch: Batch, means: dict) -> Iterator[Block]:
        """One batch through the passes of `plan`, then a block of node values per (kind, layer),
        derived lazily so that only one block's values exist at a time."""
        store = self.run_passes(plan, batch, means)
        external = self._contributions(plan, batch, means) if "contribution" in plan.computed else {}
        meta = BatchMeta(
            ordinal=batch.ordinals,
            prompt_id=batch.prompt_ids,
            position=torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device).expand_as(batch.input_ids),
            token_id=batch.input_ids,
        )
        for site, derivers in plan.sites:
            with torch.no_grad():
                ctx = Context(site, store.get, self.weights)
                values = {name: external.get((site.kind, site.layer)) if d is not None and d.external
                          else self._values(ctx, d, batch) for name, d in derivers.items()}
                block = self._block(plan, site, values, batch, meta)
            yield block

    def _contributions(self, plan: NodePlan, batch: Batch, means: dict) -> dict:
        """`contribution` values per (kind, layer) in the block layout, from executor/contrib.py's
        own forward pass over this batch (with the plan's ablations)."""
        contrib = _optional_module("tdbql.executor.contrib", "contribution")
        kinds = [s.kind for s, ds in plan.sites if ds.get("contribution") is not None]
        layers = sorted({s.layer for s, ds in plan.sites if ds.get("contribution") is not None})
        spec = next(s for s in plan.query.scalars if s.name == "contribution")
        index = {r.prompt_id: b for b, r in enumerate(batch.rows)}

        def add_hooks(hooks: HookSet, other: Batch) -> None:
            add_ablations(hooks, plan.ablations, other, means)

        B, T = batch.input_ids.shape
        table = contrib.contributions(self.loaded, batch.rows, components=sorted(set(kinds)), layers=layers,
                                      norm=int(spec.param("norm", 1)), add_hooks=add_hooks, token_budget=B * T)
        return _scatter_contributions(table, index, B, T, self.cfg, batch.input_ids.device)

    def _values(self, ctx: Context, d: Deriver | None, batch: Batch) -> torch.Tensor | None:
        if d is None:
            return None
        return d.compute(ctx).float()

    def _block(self, plan: NodePlan, site: Site, values: dict, batch: Batch, meta: BatchMeta) -> Block:
        B, T = batch.input_ids.shape
        shape = next(v.shape for v in values.values() if v is not None)
        values = {k: (v if v is not None else torch.full(shape, float("nan"), device=batch.input_ids.device))
                  for k, v in values.items()}
        everything = torch.ones((), dtype=torch.bool, device=batch.input_ids.device).expand(shape)  # a view
        block = Block(site.kind, site.layer, values, everything, meta)
        if site.kind == "attn":
            block.key_position = meta.position
            block.key_token_id = meta.token_id
        # masks stay broadcast views until a condition needs a full tensor (no per-block fills)
        mask = _and(self._valid(block, batch), _field_mask(plan.query.where, block, batch.lengths))
        if plan.query.over_prompts is None:
            mask = _and(mask, _scalar_mask(plan.query.where, block))
        block.mask = mask
        return block

    def _valid(self, block: Block, batch: Batch) -> torch.Tensor:
        B, T, K, U = block.mask.shape
        t = torch.arange(T, device=block.mask.device)
        valid = (t[None, :] < batch.lengths[:, None])[:, :, None, None]  # (batch, token, 1, 1)
        if block.key_position is not None:
            valid = valid & (t[None, None, :, None] <= t[None, :, None, None])
        if self._is_pair_plan(block):
            valid = valid & (torch.arange(B, device=valid.device) % 2 == 0)[:, None, None, None]
        return valid.expand(B, T, K, U)

    def _is_pair_plan(self, block: Block) -> bool:
        return "attrib_patch" in block.values

    # -- passes --

    def run_passes(self, plan: NodePlan, batch: Batch, means: dict) -> RawStore:
        store = RawStore()
        if not plan.raws:  # every value comes from elsewhere (contribution's own pass)
            return store
        if self.compiled is not None and compiled_refusal(plan) is None:
            self.compiled.run(plan, batch, lambda last_logits, s: self._objective(plan, batch, last_logits, s), store)
            return store
        hooks = HookSet()
        add_ablations(hooks, plan.ablations, batch, means)
        self._add_freezes(hooks, plan)
        if plan.grad_entry is not None:
            hooks.add(plan.grad_entry.location, plan.grad_entry.layer, _enter_autograd)
        for raw in sorted({Raw(r.location, r.layer) for r in plan.raws if r.pass_ != "jvp"}):
            hooks.add(raw.location, raw.layer, store.capture(raw))
        with torch.set_grad_enabled(plan.needs_backward):
            # node scalars read no logits and the loss reads the last token's: unembed only there
            logits = self.model(batch.input_ids, batch.attention_mask, hooks, logit_positions=batch.lengths - 1)
            if plan.needs_backward:
                objective = self._objective(plan, batch, logits[:, 0], store)
                store.backward(objective, [r for r in plan.raws if r.pass_ == "bwd"])
        if plan.needs_jvp:
            self._jvp_pass(plan, batch, means, store)
        return store

    def _add_freezes(self, hooks: HookSet, plan: NodePlan) -> None:
        if not plan.needs_backward:
            return
        if (plan.trace is None or plan.trace.needs_loss) and plan.freeze_ln_f:
            hooks.add("ln_f.scale", None, _detach)
        if plan.trace is not None:
            for location, layer in plan.trace.detach:
                hooks.add(location, layer, _detach)

    def _objective(self, plan: NodePlan, batch: Batch, last_logits: torch.Tensor, store: RawStore) -> torch.Tensor:
        """What the backward differentiates; `last_logits` (batch, vocab) are the logits at each
        prompt's last real token."""
        if plan.trace is not None and plan.trace.needs_loss:
            return self._value_trace_objective(plan, batch, last_logits, store)
        if plan.trace is not None:
            return self._trace_objective(plan.trace, batch, store)
        per_prompt = prompt_losses(self.loaded, plan.loss, batch.rows, last_logits)
        return per_prompt.sum()

    def _trace_objective(self, trace: TraceSpec, batch: Batch, store: RawStore) -> torch.Tensor:
        x = store.live(trace.objective)
        b = torch.arange(len(batch.rows), device=x.device)
        t = resolve_tokens(trace.token, batch)
        if trace.kind == "mlp":
            return x[b, t, trace.index].sum()
        if trace.kind == "attn":
            u = resolve_tokens(trace.key, batch)
            if bool((u > t).any()):
                raise TdbqlError(f"trace attn[{trace.layer},{trace.index}]: key {trace.key} comes after token {trace.token}")
            return x[b, trace.index, t, u].sum()
        ae = self.loaded.saes[(SAE_KINDS[trace.kind], trace.layer)]
        return ae.pre_activation(x[b, t])[:, trace.index].sum()

    def _value_trace_objective(self, plan: NodePlan, batch: Batch, last_logits: torch.Tensor, store: RawStore) -> torch.Tensor:
        """Σ over prompts of A[t,u,h]·(v[u,h] W_O[h])·stopgrad(g_down[t]), summed over keys u ≤ t
        when the trace names no key. g_down = ∂loss/∂resid.mid[L] at t (ln_f scale frozen as for
        the loss): the one extra backward a V trace costs, with the graph kept for the main one."""
        trace = plan.trace
        L, h = trace.layer, trace.index
        loss = prompt_losses(self.loaded, plan.loss, batch.rows, last_logits).sum()
        (g_down,) = torch.autograd.grad(loss, store.live(Raw("resid.mid", L)), retain_graph=True)  # no graph: stopgrad
        b = torch.arange(len(batch.rows), device=last_logits.device)
        t = resolve_tokens(trace.token, batch)
        probs = store.live(Raw("attn.probs", L))[b, h, t]  # (batch, key); Q and K detached: a constant
        v = store.live(trace.objective)[:, :, h // (self.cfg.n_heads // self.cfg.n_kv_heads)]  # (batch, key, d_head)
        g_head = g_down[b, t] @ self.model.W_O(L)[h].T  # (batch, d_head): g_down read back through W_O[h]
        per_key = probs * torch.einsum("bue,be->bu", v, g_head)  # (batch, key)
        if trace.key is None:
            keys = torch.arange(per_key.shape[1], device=per_key.device)
            return torch.where(keys[None, :] <= t[:, None], per_key, 0).sum()
        u = resolve_tokens(trace.key, batch)
        if bool((u > t).any()):
            raise TdbqlError(f"trace attn[{L},{h}]: key {trace.key} comes after token {trace.token}")
        return per_key[b, u].sum()

    # -- forward-mode pass for in_edge of nodes downstream of a trace --

    def _jvp_pass(self, plan: NodePlan, batch: Batch, means: dict, store: RawStore) -> None:
        trace = plan.trace
        hooks = HookSet()
        add_ablations(hooks, plan.ablations, batch, means)
        primal: dict[str, torch.Tensor] = {}
        for location in _write_sources(trace):
            hooks.add(location, trace.layer, _keep_primal(primal, location))
        for layer in range(self.cfg.n_layers):
            for location in ("ln1.scale", "ln2.scale"):
                hooks.add(location, layer, _drop_tangent)
        for raw in sorted(r for r in plan.raws if r.pass_ == "jvp"):
            hooks.add(raw.location, raw.layer, store.capture_tangent(raw))
        for layer in range(self.cfg.n_layers):
            for location in ("attn.out", "mlp.out"):  # direct path only: block outputs carry no tangent
                hooks.add(location, layer, _drop_tangent)
        hooks.add(trace.write, trace.layer, self._inject_write(trace, primal, batch))
        previous = self.model.attn_impl
        self.model.attn_impl = "eager"
        try:
            with torch.no_grad(), fwAD.dual_level():
                self.model(batch.input_ids, batch.attention_mask, hooks, logit_positions=batch.lengths - 1)
        finally:
            self.model.attn_impl = previous

    def _inject_write(self, trace: TraceSpec, primal: dict, batch: Batch):
        def hook(x: torch.Tensor) -> torch.Tensor:
            x = fwAD.unpack_dual(x).primal
            tangent = torch.zeros_like(x)
            b = torch.arange(x.shape[0], device=x.device)
            t = resolve_tokens(trace.token, batch)
            tangent[b, t] = self._trace_write(trace, primal, b, t, batch, x)
            return fwAD.make_dual(x, tangent)

        return hook

    def _trace_write(self, trace: TraceSpec, primal: dict, b, t, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """The traced node's write to the residual at its token: (batch, d_model). `x` is the
        tensor at the write location (the SAE input for attn / resid autoencoders)."""
        L, i = trace.layer, trace.index
        if trace.kind == "mlp":
            return primal["mlp.post"][b, t, i, None] * self.model.W_out(L)[i]
        if trace.kind == "attn":
            group = self.cfg.n_heads // self.cfg.n_kv_heads
            if trace.key is None:  # a V trace without a key: the head's whole write, keys u <= t
                probs = primal["attn.probs"][b, i, t]  # (batch, key)
                keys = torch.arange(probs.shape[1], device=probs.device)
                probs = torch.where(keys[None, :] <= t[:, None], probs, 0)
                z = torch.einsum("bu,bue->be", probs, primal["attn.v"][:, :, i // group])
                return z @ self.model.W_O(L)[i]
            u = resolve_tokens(trace.key, batch)
            v = primal["attn.v"][b, u, i // group]  # (batch, d_head)
            return primal["attn.probs"][b, i, t, u, None] * (v @ self.model.W_O(L)[i])
        site = SAE_KINDS[trace.kind]
        if site == "mlp":
            z = primal["sae.mlp.latent"][b, t, i, None]
        else:  # the latent hook runs after the write location: encode the input here
            z = self.loaded.saes[(site, L)].encode(x[b, t])[:, i, None]
        return z * self.weights.decoder(site, L)[i]

    # -- logits --

    def visit_LogitsQuery(self, query: LogitsQuery, prompts: list[PromptRow], loss: Loss | None) -> dict[str, pa.Table]:
        for cond in query.where:
            if cond.field not in ("token", "prompt"):
                raise TdbqlError(f"logits can be filtered by token and prompt, not {cond.field}")
        ablations = tuple(self._ablation(a) for a in query.ablations)
        batch_size = self.plan_batch_size(None, prompts)
        means = ablation_means(self.loaded, ablations, prompts, batch_size) if needs_means(ablations) else {}
        parts = []
        for batch in batches(self.loaded, prompts, max_prompts=batch_size):
            hooks = HookSet()
            add_ablations(hooks, ablations, batch, means)
            with torch.no_grad():
                logits = self.model(batch.input_ids, batch.attention_mask, hooks)
            parts.append(self._logit_rows(query, batch, logits))
        parts = [p for p in parts if p is not None]
        rows = concat_rows(parts) if parts else None
        table = logit_table(rows, self.loaded.token_str)
        if query.logprobs:  # the same rows, valued by log-softmax instead of the raw logit
            table = table.rename_columns(["logprob" if c == "logit" else c for c in table.column_names])
        return {"result": table}

    def _logit_rows(self, query: LogitsQuery, batch: Batch, logits: torch.Tensor):
        B, T, V = logits.shape
        block = Block("embed", None, {}, torch.ones(B, T, 1, 1, dtype=torch.bool, device=logits.device),
                      BatchMeta(batch.ordinals, batch.prompt_ids,
                                torch.arange(T, device=logits.device).expand(B, T), batch.input_ids))
        keep = _and(self._valid(block, batch), _field_mask(query.where, block, batch.lengths))
        b, t = keep[:, :, 0, 0].nonzero(as_tuple=True)
        if b.numel() == 0:
            return None
        selected = logits[b, t].float()  # (rows, vocab)
        k = min(query.k, V)
        top = selected.topk(k, dim=-1)
        # deterministic order among equal logits: lower vocab id first
        by_id = torch.sort(top.indices, dim=-1, stable=True)
        values, ids = top.values.gather(1, by_id.indices), by_id.values
        order = torch.sort(values, dim=-1, descending=True, stable=True).indices
        values, ids = values.gather(1, order), ids.gather(1, order)
        logprobs = values - torch.logsumexp(selected, dim=-1, keepdim=True)  # log-softmax of the top k
        n = b.numel()
        return {
            "prompt_id": batch.prompt_ids[b].repeat_interleave(k),
            "position": t.repeat_interleave(k),
            "vocab_id": ids.reshape(-1),
            "logit": (logprobs if query.logprobs else values).reshape(-1),
            "prob": torch.exp(logprobs).reshape(-1),
            "rank": torch.arange(1, k + 1, device=logits.device).repeat(n),
        }

    # -- queries served by other modules --

    def visit_LogitLensQuery(self, query, prompts, loss):
        lens = _optional_module("tdbql.executor.lens", "logit_lens")
        return {"result": lens.logit_lens(self.loaded, query, prompts)}

    def visit_UpvotedQuery(self, query, prompts, loss):
        lens = _optional_module("tdbql.executor.lens", "upvoted")
        return {"result": lens.upvoted(self.loaded, query, prompts)}

    def visit_RoutesQuery(self, query, prompts, loss):
        routes = _optional_module("tdbql.executor.routes", "routes")
        return routes.routes(self.loaded, query, prompts)


def _scatter_contributions(table: pa.Table, index: dict, B: int, T: int, cfg, device) -> dict:
    """Rows (prompt_id, layer, component, unit, position, attended, contribution) -> tensors
    (batch, token, key, unit) per (component, layer), NaN where no row."""
    import numpy as np

    units = {"mlp": cfg.d_mlp, "attn": cfg.n_heads, "head": cfg.n_heads}
    comp = np.asarray(table.column("component").to_pylist(), dtype=object)
    layer = table.column("layer").to_numpy(zero_copy_only=False)
    b = np.asarray([index[p] for p in table.column("prompt_id").to_pylist()], dtype=np.int64)
    t = table.column("position").to_numpy(zero_copy_only=False).astype(np.int64)
    u = table.column("attended").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    unit = table.column("unit").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    value = table.column("contribution").to_numpy(zero_copy_only=False)
    out = {}
    for kind, size in units.items():
        for L in np.unique(layer[comp == kind]):
            rows = (comp == kind) & (layer == L)
            x = torch.full((B, T, T if kind == "attn" else 1, size), float("nan"))
            x[b[rows], t[rows], u[rows] if kind == "attn" else 0, unit[rows]] = torch.from_numpy(value[rows]).float()
            out[(kind, int(L))] = x.to(device)
    return out


def _optional_module(name: str, what: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise TdbqlError(f"{what} is not available in this build ({err})") from None


SMALL_BATCH_WORK = 5 * 10**8  # tokens x parameters per batch (~1 GFLOP forward) run on one CPU thread


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 1 << 30


# --- raw tensor store ----------------------------------------------------------------------------------


class RawStore:
    """Tensors captured at hook locations; gradients from one `torch.autograd.grad` call."""

    def __init__(self) -> None:
        self.fwd: dict[Raw, torch.Tensor] = {}
        self.grads: dict[Raw, torch.Tensor] = {}
        self.tangents: dict[Raw, torch.Tensor] = {}

    def capture(self, raw: Raw) -> Callable[[torch.Tensor], None]:
        def hook(x: torch.Tensor) -> None:
            self.fwd[raw] = x

        return hook

    def capture_tangent(self, raw: Raw) -> Callable[[torch.Tensor], None]:
        def hook(x: torch.Tensor) -> None:
            tangent = fwAD.unpack_dual(x).tangent
            self.tangents[raw] = torch.zeros_like(x) if tangent is None else tangent

        return hook

    def live(self, raw: Raw) -> torch.Tensor:
        return self.fwd[Raw(raw.location, raw.layer)]

    def backward(self, objective: torch.Tensor, wanted: list[Raw]) -> None:
        inputs = [(r, self.live(r)) for r in wanted]
        graph = [(r, x) for r, x in inputs if x.requires_grad]
        grads = [None] * len(graph)
        if graph and objective.requires_grad:
            grads = torch.autograd.grad(objective, [x for _, x in graph], allow_unused=True)
        for (r, x), g in zip(graph, grads):
            self.grads[r] = torch.zeros_like(x) if g is None else g
        for r, x in inputs:
            self.grads.setdefault(r, torch.zeros_like(x))

    def get(self, raw: Raw) -> torch.Tensor:
        if raw.pass_ == "bwd":
            return self.grads[raw]
        if raw.pass_ == "jvp":
            return self.tangents[raw]
        return self.fwd[raw].detach()


# --- hooks -----------------------------------------------------------------------------------------


def _detach(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def _enter_autograd(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


def _drop_tangent(x: torch.Tensor) -> torch.Tensor:
    return fwAD.unpack_dual(x).primal


def _keep_primal(store: dict, location: str) -> Callable[[torch.Tensor], None]:
    def hook(x: torch.Tensor) -> None:
        store[location] = fwAD.unpack_dual(x).primal

    return hook


def _write_sources(trace: TraceSpec) -> tuple[str, ...]:
    if trace.kind == "mlp":
        return ("mlp.post",)
    if trace.kind == "attn":
        return ("attn.v", "attn.probs")
    return ("sae.mlp.latent",) if trace.kind == "mlp_sae" else ()


# --- losses ------------------------------------------------------------------------------------------


def loss_tokens(loaded, loss: Loss | None, row: PromptRow) -> tuple[str, list[int], list[int]]:
    """(kind, target ids, distractor ids) for one prompt; the row's own strings win."""
    kind = loss.kind if loss is not None else "logit_diff"
    targets = [row.target] if row.target else list(loss.targets if loss else ())
    if row.target:
        distractors = [row.distractor] if row.distractor else []
    else:
        distractors = [row.distractor] if row.distractor else list(loss.distractors if loss else ())
    if not targets:
        raise TdbqlError(f"prompt {row.prompt_id} has no target: set one with `target \" Mary\" vs \" John\"`")
    return kind, [_single_token(loaded, s) for s in targets], [_single_token(loaded, s) for s in distractors]


def _single_token(loaded, text: str) -> int:
    ids = loaded.encode(text)
    if len(ids) != 1:
        raise TdbqlError(f"target {text!r} is {len(ids)} tokens; targets must be single tokens")
    return ids[0]


def prompt_losses(loaded, loss: Loss | None, rows: Sequence[PromptRow], last_logits: torch.Tensor) -> torch.Tensor:
    """Per-prompt loss from the logits at each prompt's last real token (batch, vocab): (batch,)."""
    out = []
    for b, row in enumerate(rows):
        kind, targets, distractors = loss_tokens(loaded, loss, row)
        last = last_logits[b].float()
        if kind == "logprob":
            out.append(torch.log_softmax(last, -1)[targets].mean())
            continue
        value = last[targets].mean()
        if distractors:
            value = value - last[distractors].mean()
        out.append(value)
    return torch.stack(out)


# --- conditions ------------------------------------------------------------------------------------------


def _static_conditions_pass(where: Sequence[Condition], kind: str, layer: int | None) -> bool:
    for cond in where:
        if cond.field == "component" and not _compare(torch.tensor(0), cond.op, cond.value, text=kind):
            return False
        if cond.field == "layer":
            if layer is None or not bool(_compare(torch.tensor(layer), cond.op, cond.value)):
                return False
    return True


def _token_conditions_relative(where: Sequence[Condition]) -> bool:
    values = [c.value for c in where if c.field == "token"]
    if not values:
        return False

    def negative(v) -> bool:
        if isinstance(v, Range):
            return v.lo < 0 and v.hi < 0
        if isinstance(v, tuple):
            return all(x < 0 for x in v)
        return isinstance(v, (int, float)) and v < 0

    return all(negative(v) for v in values)


def _compare(x: torch.Tensor, op: str, value, *, rel: torch.Tensor | None = None, text: str | None = None):
    """`x op value`; with `rel` (positions from the end), negative bounds compare against it."""
    if text is not None:
        options = value if isinstance(value, tuple) else (value,)
        hit = text in options if op == "in" else (text == value if op == "=" else text != value if op == "!=" else False)
        return torch.tensor(hit)

    def side(v):
        return rel if (rel is not None and v < 0) else x

    if isinstance(value, Range):
        return (side(value.lo) >= value.lo) & (side(value.hi) <= value.hi)
    if isinstance(value, tuple):
        out = torch.zeros_like(x, dtype=torch.bool)
        for v in value:
            out = out | (side(v) == v)
        return out
    if isinstance(value, str):
        raise TdbqlError(f"cannot compare a number with {value!r}")
    y = side(value)
    ops = {"=": torch.eq, "!=": torch.ne, "<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "in": torch.eq}
    return ops[op](y, value)


def _and(mask: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    """`mask & other` (None: no condition), keeping `mask`'s shape."""
    if other is None:
        return mask
    return (mask & other).expand(mask.shape)


def _field_mask(where: Sequence[Condition], block: Block, lengths: torch.Tensor) -> torch.Tensor | None:
    """Conditions on node fields (not scalars), broadcastable to (batch, token, key, unit);
    None when there are none."""
    if all(cond.field in ("layer", "component") or cond.field not in NODE_FIELDS for cond in where):
        return None
    B, T, K, U = block.mask.shape
    device = block.mask.device
    out = torch.ones((), dtype=torch.bool, device=device)
    t = torch.arange(T, device=device)[None, :, None, None]
    length = lengths[:, None, None, None]
    units = torch.arange(U, device=device)[None, None, None, :]
    has_units = block.kind not in ("embed", *ERROR_KINDS)
    for cond in where:
        f = cond.field
        if f in ("layer", "component"):
            continue  # decided per block before any tensor work
        if f == "token":
            out = out & _compare(t, cond.op, cond.value, rel=t - length)
        elif f == "attended":
            if block.key_position is None:
                return torch.zeros_like(out)
            u = torch.arange(K, device=device)[None, None, :, None]
            out = out & _compare(u, cond.op, cond.value, rel=u - length)
        elif f == "head":
            if block.kind not in ("attn", "head"):
                return torch.zeros_like(out)
            out = out & _compare(units, cond.op, cond.value)
        elif f == "unit":
            if not has_units:
                return torch.zeros_like(out)
            out = out & _compare(units, cond.op, cond.value)
        elif f == "prompt":
            out = out & _compare(block.meta.prompt_id[:, None, None, None], cond.op, cond.value)
    return out


def _scalar_mask(where: Sequence[Condition], block: Block) -> torch.Tensor | None:
    """Conditions on scalars (NaN fails every condition); None when there are none."""
    if all(cond.field in NODE_FIELDS for cond in where):
        return None
    out = torch.ones((), dtype=torch.bool, device=block.mask.device)
    for cond in where:
        if cond.field in NODE_FIELDS:
            continue
        value = block.values[cond.field]
        out = out & _compare(value, cond.op, cond.value) & ~torch.isnan(value)
    return out


def _group_order(rows: dict, by: Sequence[str]) -> torch.Tensor:
    from .reduce import group_ids

    return group_ids(rows, tuple(by))


__all__ = ["Engine", "MemoryEstimate", "NodePlan", "prompt_losses", "loss_tokens"]
