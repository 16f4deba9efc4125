"""The passes of a node plan over one batch: forward, at most one backward, maybe a JVP.

    store = run_passes(loaded, plan, batch, edits)     # RawStore: forward values, gradients, tangents

One forward pass with only the hooks the plan needs (the interventions first: ablations and
patches; then detaches, the autograd entry, the captures and the contribution capture, so that
every capture sees the edited values);
at most one backward (`torch.autograd.grad` on the summed per-prompt objective: the loss, or a
traced node's pre-activation; a trace `via v` first takes one extra backward from the loss for
g_down, see `_value_trace_objective`); and, for `in_edge` of nodes downstream of a trace, one
forward-mode (JVP) pass. Weights never take gradients (they are frozen when loaded); the first
location whose gradient is needed re-enters autograd with `x.detach().requires_grad_()`, so
nothing below it is recorded. The ln_f scale is frozen in the backward pass (`freeze_ln_f`) so
direct effects add up to the loss exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import forward_ad as fwAD

from ..query.errors import TdbqlError
from .contrib import ContributionCapture, LayerContributions
from .interventions import Interventions
from .keys import keys_up_to
from .losses import prompt_losses
from .physical import NodePlan, TraceSpec
from .runtime.batching import Batch, resolve_tokens
from .runtime.hooks import HookSet
from .scalars import Raw


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


def run_passes(loaded, plan: NodePlan, batch: Batch, edits: Interventions, *, compiled=None) -> RawStore:
    """The plan's passes over `batch` under `edits` (its ablations and patch); `compiled` (a
    CompiledPasses) runs the plain plans it takes."""
    store = RawStore()
    if compiled is not None and compiled.takes(plan):
        compiled.run(plan, batch, lambda last_logits, s: objective(loaded, plan, batch, last_logits, s), store)
        return store
    hooks = HookSet()
    edits.add(hooks, batch)
    _add_freezes(hooks, plan)
    if plan.grad_entry is not None:
        hooks.add(plan.grad_entry.location, plan.grad_entry.layer, _enter_autograd)
    for raw in plan.captured():
        if raw.location.startswith("contrib."):
            continue
        hooks.add(raw.location, raw.layer, store.capture(raw))
    _add_contribution_capture(hooks, loaded, plan, batch, store)
    with torch.set_grad_enabled(plan.needs_backward):
        # node scalars read no logits and the loss reads the last token's: unembed only there
        logits = loaded.model(batch.input_ids, batch.attention_mask, hooks, logit_positions=batch.lengths - 1)
        if plan.needs_backward:
            store.backward(objective(loaded, plan, batch, logits[:, 0], store),
                           [r for r in plan.raws if r.pass_ == "bwd"])
    if plan.needs_jvp:
        _jvp_pass(loaded, plan, batch, edits, store)
    return store


def _add_freezes(hooks: HookSet, plan: NodePlan) -> None:
    if not plan.needs_backward:
        return
    if plan.loss_backward and plan.freeze_ln_f:
        hooks.add("ln_f.scale", None, _detach)
    if plan.trace is not None:
        for location, layer in plan.trace.detach:
            hooks.add(location, layer, _detach)


# --- contributions (LLM-TT proximities) in the same forward pass --------------------------------------


def _add_contribution_capture(hooks: HookSet, loaded, plan: NodePlan, batch: Batch, store: RawStore) -> None:
    """Capture hooks that write each layer's shares into the store as contrib.attn / contrib.mlp."""
    cfg = loaded.config
    B, T = batch.input_ids.shape
    device = batch.input_ids.device
    shapes = {"contrib.attn": (B, T, T, cfg.n_heads), "contrib.mlp": (B, T, 1, cfg.d_mlp)}

    def sink(res: LayerContributions) -> None:
        attention = res.attn is not None
        location = "contrib.attn" if attention else "contrib.mlp"
        value = res.attn if attention else res.neurons[:, None, :]  # (query, key, head) / (query, 1, neuron)
        raw = Raw(location, res.layer)
        if raw not in store.fwd:
            store.fwd[raw] = torch.zeros(shapes[location], dtype=torch.float32, device=device)
        store.fwd[raw][res.prompt_index, res.queries, : value.shape[1]] = value.float()

    for location in ("contrib.attn", "contrib.mlp"):
        layers = sorted(r.layer for r in plan.raws if r.location == location)
        if layers:
            attention = location == "contrib.attn"
            ContributionCapture(loaded.model, batch, layers, attention=attention, mlp_blocks=False,
                                neurons=not attention, norm=plan.contribution_norm, queries=None,
                                sink=sink).install(hooks)


# --- objectives -----------------------------------------------------------------------------------------


def objective(loaded, plan: NodePlan, batch: Batch, last_logits: torch.Tensor, store: RawStore) -> torch.Tensor:
    """What the backward differentiates; `last_logits` (batch, vocab) are the logits at each
    prompt's last real token."""
    if plan.trace is not None and plan.trace.needs_loss:
        return _value_trace_objective(loaded, plan, batch, last_logits, store)
    if plan.trace is not None:
        return _trace_objective(loaded, plan.trace, batch, store)
    return prompt_losses(loaded.encode, plan.loss, batch.rows, last_logits).sum()


def _trace_objective(loaded, trace: TraceSpec, batch: Batch, store: RawStore) -> torch.Tensor:
    x = store.live(trace.objective)
    b = torch.arange(len(batch.rows), device=x.device)
    t = resolve_tokens(trace.token, batch)
    if trace.kind == "mlp":
        return x[b, t, trace.index].sum()
    if trace.kind == "attn":
        return x[b, trace.index, t, _key_positions(trace, batch, t)].sum()
    ae = loaded.saes[(_sae_site(trace), trace.layer)]
    return ae.pre_activation(x[b, t])[:, trace.index].sum()


def _sae_site(trace: TraceSpec) -> str:
    return trace.kind.removesuffix("_sae")


def _key_positions(trace: TraceSpec, batch: Batch, t: torch.Tensor) -> torch.Tensor:
    """The traced key token per prompt; an error where it comes after the query token."""
    u = resolve_tokens(trace.key, batch)
    if bool((u > t).any()):
        raise TdbqlError(f"trace attn[{trace.layer},{trace.index}]: key {trace.key} comes after token {trace.token}")
    return u


def _value_trace_objective(loaded, plan: NodePlan, batch: Batch, last_logits: torch.Tensor,
                           store: RawStore) -> torch.Tensor:
    """Σ over prompts of A[t,u,h]·(v[u,h] W_O[h])·stopgrad(g_down[t]), summed over keys u ≤ t
    when the trace names no key. g_down = ∂loss/∂resid.mid[L] at t (ln_f scale frozen as for
    the loss): the one extra backward a V trace costs, with the graph kept for the main one."""
    trace, cfg, model = plan.trace, loaded.config, loaded.model
    L, h = trace.layer, trace.index
    loss = prompt_losses(loaded.encode, plan.loss, batch.rows, last_logits).sum()
    (g_down,) = torch.autograd.grad(loss, store.live(Raw("resid.mid", L)), retain_graph=True)  # no graph: stopgrad
    b = torch.arange(len(batch.rows), device=last_logits.device)
    t = resolve_tokens(trace.token, batch)
    probs = store.live(Raw("attn.probs", L))[b, h, t]  # (batch, key); Q and K detached: a constant
    v = store.live(trace.objective)[:, :, h // (cfg.n_heads // cfg.n_kv_heads)]  # (batch, key, d_head)
    g_head = g_down[b, t] @ model.W_O(L)[h].T  # (batch, d_head): g_down read back through W_O[h]
    post = model.write_scale_location("attn")  # post-norm families: / its scale, held constant
    if post is not None:
        g_head = g_head / store.live(Raw(post, L))[b, t].detach()
    per_key = probs * torch.einsum("bue,be->bu", v, g_head)  # (batch, key)
    if trace.key is None:
        return torch.where(keys_up_to(t, per_key.shape[1]), per_key, 0).sum()
    return per_key[b, _key_positions(trace, batch, t)].sum()


# --- forward-mode pass for in_edge of nodes downstream of a trace ---------------------------------------


def _jvp_pass(loaded, plan: NodePlan, batch: Batch, edits: Interventions, store: RawStore) -> None:
    trace, n_layers = plan.trace, loaded.config.n_layers
    hooks = HookSet()
    edits.add(hooks, batch)
    primal: dict[str, torch.Tensor] = {}
    for location in _write_sources(trace, loaded):
        hooks.add(location, trace.layer, _keep_primal(primal, location))
    for layer in range(n_layers):
        for location in ("ln1.scale", "ln2.scale", "q_norm.scale", "k_norm.scale"):
            hooks.add(location, layer, _drop_tangent)
    for raw in sorted(r for r in plan.raws if r.pass_ == "jvp"):
        hooks.add(raw.location, raw.layer, store.capture_tangent(raw))
    for layer in range(n_layers):
        for location in ("attn.out", "mlp.out"):  # direct path only: block outputs carry no tangent
            hooks.add(location, layer, _drop_tangent)
    hooks.add(trace.write, trace.layer, _inject_write(loaded, trace, primal, batch))
    with torch.no_grad(), fwAD.dual_level():
        loaded.model(batch.input_ids, batch.attention_mask, hooks, logit_positions=batch.lengths - 1,
                     attn_impl="eager")


def _inject_write(loaded, trace: TraceSpec, primal: dict, batch: Batch):
    def hook(x: torch.Tensor) -> torch.Tensor:
        x = fwAD.unpack_dual(x).primal
        tangent = torch.zeros_like(x)
        b = torch.arange(x.shape[0], device=x.device)
        t = resolve_tokens(trace.token, batch)
        tangent[b, t] = _trace_write(loaded, trace, primal, b, t, batch, x)
        return fwAD.make_dual(x, tangent)

    return hook


def _trace_write(loaded, trace: TraceSpec, primal: dict, b, t, batch: Batch, x: torch.Tensor) -> torch.Tensor:
    """The traced node's write to the residual at its token: (batch, d_model). `x` is the
    tensor at the write location (the SAE input for attn / resid autoencoders)."""
    write = _unscaled_write(loaded, trace, primal, b, t, batch, x)
    post = _write_scale(trace, loaded.model)
    return write if post is None else write / primal[post][b, t]  # post-norm families: / its scale at t


def _write_scale(trace: TraceSpec, model) -> str | None:
    """The post-norm scale dividing the traced node's write (attn / resid autoencoders write
    after the post-norm: none)."""
    site = {"mlp": "mlp", "mlp_sae": "mlp", "attn": "attn"}.get(trace.kind)
    return None if site is None else model.write_scale_location(site)


def _unscaled_write(loaded, trace: TraceSpec, primal: dict, b, t, batch: Batch, x: torch.Tensor) -> torch.Tensor:
    model, cfg = loaded.model, loaded.config
    L, i = trace.layer, trace.index
    if trace.kind == "mlp":
        return primal["mlp.post"][b, t, i, None] * model.W_out(L)[i]
    if trace.kind == "attn":
        group = cfg.n_heads // cfg.n_kv_heads
        if trace.key is None:  # a V trace without a key: the head's whole write, keys u <= t
            probs = primal["attn.probs"][b, i, t]  # (batch, key)
            probs = torch.where(keys_up_to(t, probs.shape[1]), probs, 0)
            z = torch.einsum("bu,bue->be", probs, primal["attn.v"][:, :, i // group])
            return z @ model.W_O(L)[i]
        u = resolve_tokens(trace.key, batch)
        v = primal["attn.v"][b, u, i // group]  # (batch, d_head)
        return primal["attn.probs"][b, i, t, u, None] * (v @ model.W_O(L)[i])
    site = _sae_site(trace)
    ae = loaded.saes[(site, L)]
    if site in ("mlp", "mlp_tc"):  # the latent hook ran before the write location
        z, divisor = primal[f"sae.{site}.latent"][b, t, i, None], primal.get(f"sae.{site}.scale")
        divisor = None if divisor is None else divisor[b, t]
    else:  # the latent hook runs after the write location: encode the input here
        x_in, norm = ae.normalise(x[b, t])
        z, divisor = ae.activate(ae._linear(x_in))[:, i, None], None if norm is None else norm.divisor
    write = z * loaded.decoder_in_resid(site, L)[i]
    return write if divisor is None else write / divisor  # an autoencoder that normalises its input


def _write_sources(trace: TraceSpec, loaded) -> tuple[str, ...]:
    """The forward values the traced node's write is made of (and the post-norm scale dividing
    it, where the family has one; an MLP autoencoder's output divisor, where it normalises)."""
    if trace.kind == "mlp":
        sources = ("mlp.post",)
    elif trace.kind == "attn":
        sources = ("attn.v", "attn.probs")
    elif trace.kind in ("mlp_sae", "mlp_tc"):
        site = _sae_site(trace)
        sources = (f"sae.{site}.latent",)
        if site == "mlp" and loaded.saes[(site, trace.layer)].normalize != "none":
            sources += ("sae.mlp.scale",)
    else:
        sources = ()
    post = _write_scale(trace, loaded.model)
    return sources if post is None else sources + (post,)


# --- hook functions ---------------------------------------------------------------------------------------


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
