"""`explain`: the compiled plan of a node query as text (passes, hooks, tensors kept, memory)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .compiled import refusal
from .runtime.hooks import location_shape
from .scalars import Raw
from ..query.context import PromptRow


def raw_numel(engine, raw: Raw, n_tokens: int) -> int:
    """Elements of one prompt's tensor at `raw` (n_tokens tokens)."""
    return math.prod(location_shape(raw.location, raw.layer, engine.cfg, engine.loaded.saes, n_tokens))


def block_numel(engine, site, n_tokens: int) -> int:
    """Elements of one prompt's block of node values at `site`: (token, key, unit)."""
    c = engine.cfg
    if site.kind == "attn":
        return n_tokens * n_tokens * c.n_heads
    if site.kind == "head":
        return n_tokens * c.n_heads
    if site.kind == "mlp":
        return n_tokens * c.d_mlp
    ae = engine.loaded.saes.get((site.sae_site, site.layer)) if site.sae_site else None
    if ae is not None and site.kind.endswith("_sae"):
        return n_tokens * ae.n_latents
    return n_tokens  # embed, sae errors: one unit


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _where(raw: Raw) -> str:
    return raw.location if raw.layer is None else f"{raw.location}[{raw.layer}]"


def _passes(plan, compiled: bool) -> list[str]:
    passes = []
    if plan.mean_pass:
        passes.append("once, before the batches: a forward pass over the whole prompt set (no grad) to compute "
                      "the =mean ablation values")
    if not plan.raws:
        return passes + ["per batch: the forward pass of executor/contrib.py (LLM-TT proximities), no other"]
    if compiled:
        forward = "per batch: compiled forward" + (" (autograd from zero probes)" if plan.needs_backward else " under no_grad")
    else:
        forward = "per batch: forward" + (" (autograd from " + _where(plan.grad_entry) + ")" if plan.grad_entry else " under no_grad")
    passes.append(forward)
    if plan.needs_backward:
        kind = plan.loss.kind if plan.loss is not None else "logit_diff"
        t = plan.trace
        if t is not None and t.needs_loss:
            passes.append(f"per batch: extra backward (torch.autograd.grad, retain_graph) from the {kind} loss to "
                          f"resid.mid[{t.layer}] at token {t.token}: g_down, the one extra backward a V trace costs")
            keys = f"key {t.key}" if t.key is not None else "summed over keys u <= t"
            origin = (f"A·(v W_O)·stopgrad(g_down) of attn[{t.layer},{t.index}]@{t.token} ({keys}; "
                      "V path only: Q, K and the ln1 scale detached)")
        elif t is not None:
            origin = f"the pre-activation of {t.kind}[{t.layer},{t.index}]@{t.token}" + (f":{t.key}" if t.key is not None else "")
        else:
            origin = f"the {kind} loss at each prompt's last token"
        passes.append(f"per batch: backward (torch.autograd.grad, no weight gradients) from {origin}")
    if plan.needs_jvp:
        passes.append("per batch: forward-mode JVP along the traced node's write (in_edge of downstream nodes)")
    return passes


def _hooks(plan, compiled: bool) -> list[str]:
    lines = []
    for a in plan.ablations:
        at = "all tokens" if a.token is None else f"token {a.token}"
        lines.append(f"{a.location}[{a.layer}]  ablate index {a.index} at {at} = {a.value}")
    if plan.needs_backward and (plan.trace is None or plan.trace.needs_loss) and plan.freeze_ln_f:
        lines.append("ln_f.scale  detach (ln_f scale frozen in the backward pass)")
    if plan.needs_backward and plan.trace is not None:
        for location, layer in plan.trace.detach:
            lines.append(f"{location}[{layer}]  detach (trace)")
    if plan.grad_entry is not None and not compiled:
        lines.append(f"{_where(plan.grad_entry)}  x.detach().requires_grad_() (autograd starts here)")
    for raw in sorted({Raw(r.location, r.layer) for r in plan.raws if r.pass_ != "jvp"}):
        passes = sorted(r.pass_ for r in plan.raws if (r.location, r.layer) == (raw.location, raw.layer))
        probe = " + zero probe (its gradient)" if compiled and "bwd" in passes else ""
        lines.append(f"{_where(raw)}  capture ({', '.join(passes)}){probe}")
    for raw in sorted(r for r in plan.raws if r.pass_ == "jvp"):
        lines.append(f"{_where(raw)}  capture tangent (jvp)")
    return lines


def _path(engine, plan) -> str:
    if engine.compiled is None:
        return "execution: eager (set compile = on for torch.compile)"
    why_not = refusal(plan)
    if why_not is not None:
        return f"execution: eager (compile does not cover a {why_not})"
    return "execution: torch.compile, one graph per batch shape (zero probes give the gradients)"


def _memory_parts(memory, batch_size: int) -> str:
    parts = ", ".join(f"{name} {_fmt_bytes(n * batch_size)}" for name, n in memory.parts.items() if n)
    return parts or "nothing"


def explain_plan(engine, plan, prompts: Sequence[PromptRow]) -> str:
    q = plan.query
    batch_size = engine.plan_batch_size(plan, prompts)
    memory = engine.estimate_memory(plan, prompts)
    n_tokens = memory.n_tokens
    element = torch.finfo(engine.loaded.dtype).bits // 8
    kept = sum(raw_numel(engine, r, n_tokens) for r in plan.raws) * element * batch_size
    eager = sorted({r.layer for r in plan.raws if r.location in ("attn.logits", "attn.probs")})
    reduce = (f"over prompts {q.over_prompts}, then " if q.over_prompts else "") + (
        "dense rows (select)" if q.mode == "select"
        else f"running {q.mode} {q.k} by {plan.scalars[0]}" + (f" per {', '.join(q.by)}" if q.by else " overall")
    )
    n_batches = -(-len(prompts) // batch_size)
    compiled = engine.compiled is not None and refusal(plan) is None
    lines = [
        f"node query: {', '.join(plan.scalars)} of {', '.join(plan.kinds)}",
        f"prompts: {len(prompts)} in {n_batches} batch(es) of up to {batch_size} (right-padded, masked)",
        "passes:",
        *(f"  {i + 1}. {p}" for i, p in enumerate(_passes(plan, compiled))),
        "hooks:",
        *(f"  {h}" for h in _hooks(plan, compiled) or ["(none)"]),
        f"attention: eager (probabilities) at layers {eager}; fused SDPA elsewhere" if eager
        else "attention: fused SDPA at every layer (no probabilities needed)",
        f"blocks derived per batch: {len(plan.sites)} (kind x layer)",
        f"reduction on the device: {reduce}",
        f"tensors kept per batch: {_fmt_bytes(kept)} (prompts padded to {n_tokens} tokens)",
        f"estimated peak memory: {_fmt_bytes(memory.peak(batch_size))} (weights {_fmt_bytes(memory.weights)}; "
        f"per batch {_memory_parts(memory, batch_size)})",
    ]
    lines.append(_path(engine, plan))
    if "contribution" in plan.computed and plan.raws:
        lines.append("contribution: one more forward pass per batch in executor/contrib.py (LLM-TT proximities)")
    if plan.pairs:
        lines.append("attrib_patch: prompts read as (clean, corrupted) pairs 0-1, 2-3, ...; rows for clean prompts")
    return "\n".join(lines)
