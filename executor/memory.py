"""Memory: the estimated peak of a query's batches, and the batch size that fits a budget.

Peak memory of one batch = weights + batch size x bytes per prompt, for the longest prompt (its
real token count T; every prompt of a batch is padded to the longest). Per prompt, counted in
the model's dtype (fp32 for reduction buffers), elements per token:

- saved: what autograd keeps for the backward pass, for each layer from the gradient entry
  layer up (the forward runs under autograd from there): per layer norm the centred input and
  the scale (d_model + 1); per attention either, eager, q, k and v as copies (3 n_heads d_head)
  plus the probabilities (n_heads T) and the bool mask (T bytes), or, fused SDPA, q, k, v, the
  output and the log-sum-exp ((n_heads + 2 n_kv_heads + 1) d_head + n_heads); per MLP the
  pre-activation (d_mlp; x3 for a gated MLP, whose gate output and up branch are saved too); per
  attached autoencoder 2 n_latents; ln_f as a layer norm. Weights are frozen, so linear layers
  save no inputs. Nothing when there is no backward.
- logits: (T, vocab), alive through the backward; its gradient as large again when the
  objective is the loss (a traced pre-activation does not reach the logits). Node passes unembed
  only each prompt's last token, so T is 1 there.
- captured: each hooked tensor the plan keeps (forward values, also where only the gradient is
  wanted, contribution shares, and jvp tangents), except the ones autograd already saves in
  recorded layers (mlp.pre, eager attn.probs, the norm scales).
- grads: each gradient the backward returns, full size.
- working: one layer's transient intermediates (attention logits and probabilities, the MLP's
  hidden activations); x2 for the JVP pass (dual tensors).
- reduction: deriving one (component, layer) block at a time after the passes: the largest
  block (token x key x unit) in fp32, per scalar plus its mask.

Peak per prompt = max(passes: saved + logits + captured + grads + working, derivation:
captured + grads + reduction). Ignored: the autograd graph's metadata, allocator fragmentation,
and the saved tensors freed while the backward runs (so the figure is an upper bound on the
tensors, not on the process's RSS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .physical import NodePlan
from .runtime.hooks import location_shape
from .scalars import Raw, Site

# shapes (per prompt) of the contribution locations the pass fills (they are not hook points)
_CONTRIBUTION_DIMS = {"contrib.attn": ("token", "key", "head"), "contrib.mlp": ("token", "one", "d_mlp")}
MAX_AUTO_BATCH = 64


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of a query's batches (see the module docstring for what is counted)."""

    weights: int  # model and autoencoder parameters, bytes
    per_prompt: int  # bytes one prompt adds to a batch
    n_tokens: int  # real tokens of the longest prompt (the padded width)
    parts: dict[str, int]  # per-prompt bytes: saved, logits, captured, grads, working, reduction

    def peak(self, batch_size: int) -> int:
        return self.weights + batch_size * self.per_prompt


def raw_numel(loaded, raw: Raw, n_tokens: int) -> int:
    """Elements of one prompt's tensor at `raw` (n_tokens tokens)."""
    cfg = loaded.config
    if raw.location in _CONTRIBUTION_DIMS:
        sizes = {"token": n_tokens, "key": n_tokens, "head": cfg.n_heads, "d_mlp": cfg.d_mlp, "one": 1}
        return math.prod(sizes[d] for d in _CONTRIBUTION_DIMS[raw.location])
    return math.prod(location_shape(raw.location, raw.layer, cfg, loaded.saes, n_tokens))


def block_numel(loaded, site: Site, n_tokens: int) -> int:
    """Elements of one prompt's block of node values at `site`: (token, key, unit)."""
    c = loaded.config
    if site.kind == "attn":
        return n_tokens * n_tokens * c.n_heads
    if site.kind == "head":
        return n_tokens * c.n_heads
    if site.kind == "mlp":
        return n_tokens * c.d_mlp
    ae = loaded.saes.get((site.sae_site, site.layer)) if site.sae_site else None
    if ae is not None and site.kind.endswith("_sae"):
        return n_tokens * ae.n_latents
    return n_tokens  # embed, sae errors: one unit


def estimate_memory(loaded, plan: NodePlan | None, n_tokens: int) -> MemoryEstimate:
    """The estimate for prompts padded to `n_tokens`; `plan` None: a forward-only query (logits,
    lens) that unembeds every token."""
    T = n_tokens
    element = torch.finfo(loaded.dtype).bits // 8
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    weights += sum(p.numel() * p.element_size() for ae in loaded.saes.values() for p in ae.parameters())
    loss_backward = plan is not None and plan.loss_backward
    parts = {
        "saved": _saved_numel(loaded, plan, T) * element,
        "logits": (1 if plan is not None else T) * loaded.config.vocab_size * element * (2 if loss_backward else 1),
        "captured": _captured_numel(loaded, plan, T) * element,
        "grads": sum(raw_numel(loaded, r, T) for r in plan.raws if r.pass_ == "bwd") * element if plan else 0,
        "working": _working_numel(loaded.config, T, plan) * element * (2 if plan and plan.needs_jvp else 1),
        "reduction": _reduction_numel(loaded, plan, T) * 4,
    }
    passes = parts["saved"] + parts["logits"] + parts["captured"] + parts["grads"] + parts["working"]
    derive = parts["captured"] + parts["grads"] + parts["reduction"]
    return MemoryEstimate(weights=weights, per_prompt=max(passes, derive), n_tokens=T, parts=parts)


def batch_size_for(memory: MemoryEstimate, budget: int, *, pairs: bool = False) -> int:
    """Prompts per batch the budget allows for the batch's tensors (the weights are resident),
    at most MAX_AUTO_BATCH; even for prompt pairs."""
    size = int(max(1, min(MAX_AUTO_BATCH, budget // max(memory.per_prompt, 1))))
    return size + 1 if pairs and size % 2 else size


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 1 << 30


def _recorded_layers(cfg, plan: NodePlan | None) -> range:
    """Layers whose forward autograd records: from the gradient entry up."""
    if plan is None or not plan.needs_backward or plan.grad_entry is None:
        return range(0)
    first = 0 if plan.grad_entry.layer is None else plan.grad_entry.layer
    return range(first, cfg.n_layers)


def _saved_numel(loaded, plan: NodePlan | None, T: int) -> int:
    """Elements autograd saves for one prompt."""
    c = loaded.config
    layers = _recorded_layers(c, plan)
    if not layers:
        return 0
    norm = c.d_model + 1
    eager_attn = 3 * c.n_heads * c.d_head + c.n_heads * T + T // 8 + 1  # bool mask: T bytes
    fused_attn = (c.n_heads + 2 * c.n_kv_heads + 1) * c.d_head + c.n_heads
    mlp = c.d_mlp * (3 if c.gated_mlp else 1)
    per_token = norm  # ln_f
    for layer in layers:
        per_token += 2 * norm + mlp + (eager_attn if layer in plan.eager_layers else fused_attn)
        per_token += sum(2 * ae.n_latents for (_, at), ae in loaded.saes.items() if at == layer)
    return T * per_token


def _captured_numel(loaded, plan: NodePlan | None, T: int) -> int:
    if plan is None:
        return 0
    recorded = set(_recorded_layers(loaded.config, plan))
    kept = set(plan.captured()) | {r for r in plan.raws if r.pass_ == "jvp"}

    def saved_anyway(raw: Raw) -> bool:
        if raw.pass_ == "jvp" or raw.layer not in recorded:
            return False
        return raw.location in ("mlp.pre", "ln1.scale", "ln2.scale") or (
            raw.location == "attn.probs" and raw.layer in plan.eager_layers)

    return sum(raw_numel(loaded, r, T) for r in kept if not saved_anyway(r))


def _working_numel(c, T: int, plan: NodePlan | None) -> int:
    """One layer's transient intermediates for one prompt."""
    eager = plan is not None and bool(plan.eager_layers)
    attention = 2 * c.n_heads * T if eager else c.n_heads * c.d_head
    return T * (attention + 2 * c.d_mlp + 4 * c.d_model)


def _reduction_numel(loaded, plan: NodePlan | None, T: int) -> int:
    if plan is None or not plan.sites:
        return 0
    largest = max(block_numel(loaded, p.site, T) for p in plan.sites)
    return largest * (len(plan.scalars) + 1)
