"""`explain`: a physical node plan as text (passes, hooks, tensors kept, memory, execution path).

A pure function of the plan and its figures, so the plan fixtures (tests/fixtures/explain) pin it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .interventions import PatchSpec
from .memory import MemoryEstimate
from .physical import NodePlan
from .scalars import CONTRIBUTION_LOCATIONS, Raw


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _where(raw: Raw) -> str:
    return raw.location if raw.layer is None else f"{raw.location}[{raw.layer}]"


def _passes(plan: NodePlan, compiled: bool) -> list[str]:
    passes = []
    if plan.mean_pass:
        passes.append("once, before the batches: a forward pass over the whole prompt set (no grad) to compute "
                      "the =mean ablation values")
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


def _hooks(plan: NodePlan, compiled: bool) -> list[str]:
    lines = []
    for a in plan.ablations:
        at = "all tokens" if a.token is None else f"token {a.token}"
        lines.append(f"{a.location}[{a.layer}]  ablate index {a.index} at {at} = {a.value}")
    if plan.needs_backward and plan.loss_backward and plan.freeze_ln_f:
        lines.append("ln_f.scale  detach (ln_f scale frozen in the backward pass)")
    if plan.needs_backward and plan.trace is not None:
        for location, layer in plan.trace.detach:
            lines.append(f"{location}[{layer}]  detach (trace)")
    if plan.grad_entry is not None and not compiled:
        lines.append(f"{_where(plan.grad_entry)}  x.detach().requires_grad_() (autograd starts here)")
    for raw in plan.captured():
        if raw.location in CONTRIBUTION_LOCATIONS:
            lines.append(f"{_where(raw)}  contribution shares (LLM-TT proximities) computed in this pass, norm "
                         f"{plan.contribution_norm}")
            continue
        passes = sorted(r.pass_ for r in plan.raws if (r.location, r.layer) == (raw.location, raw.layer))
        probe = " + zero probe (its gradient)" if compiled and "bwd" in passes else ""
        lines.append(f"{_where(raw)}  capture ({', '.join(passes)}){probe}")
    for raw in sorted(r for r in plan.raws if r.pass_ == "jvp"):
        lines.append(f"{_where(raw)}  capture tangent (jvp)")
    return lines


def _reduction(plan: NodePlan) -> str:
    q = plan.query
    over = f"over prompts {q.over_prompts}, then " if q.over_prompts else ""
    if q.mode == "select":
        return over + "dense rows (select)"
    return over + f"running {q.mode} {q.k} by {plan.scalars[0]}" + (f" per {', '.join(q.by)}" if q.by else " overall")


def explain_plan(plan: NodePlan, *, memory: MemoryEstimate, batch_size: int, n_prompts: int, kept_bytes: int,
                 path: str) -> str:
    """The text `explain` prints; `path` names the execution path (eager, or why not compiled)."""
    compiled = path.startswith("execution: torch.compile")
    n_batches = -(-n_prompts // batch_size)
    eager = sorted(plan.eager_layers)
    lines = [
        f"node query: {', '.join(plan.scalars)} of {', '.join(plan.query.components)}",
        f"prompts: {n_prompts} in {n_batches} batch(es) of up to {batch_size} (right-padded, masked)",
        "passes:",
        *(f"  {i + 1}. {p}" for i, p in enumerate(_passes(plan, compiled))),
        "hooks:",
        *(f"  {h}" for h in _hooks(plan, compiled) or ["(none)"]),
        f"attention: eager (probabilities) at layers {eager}; fused SDPA elsewhere" if eager
        else "attention: fused SDPA at every layer (no probabilities needed)",
        f"blocks derived per batch: {len(plan.sites)} (component x layer)",
        f"reduction on the device: {_reduction(plan)}",
        f"tensors kept per batch: {fmt_bytes(kept_bytes)} (prompts padded to {memory.n_tokens} tokens)",
        f"estimated peak memory: {fmt_bytes(memory.peak(batch_size))} (weights {fmt_bytes(memory.weights)}; "
        f"per batch {_memory_parts(memory, batch_size)})",
        path,
    ]
    if plan.pairs:
        lines.append("attrib_patch: prompts read as (clean, corrupted) pairs (each prompt's corrupt one, else "
                     "prompts 0-1, 2-3, ...); rows for clean prompts")
    lines += explain_patch(plan.patch, plan.query.patch.source if plan.patch else "")
    if plan.query.verify:
        lines.append(explain_verify(plan, plan.query.k or 0, batch_size))
    return "\n".join(lines)


def _memory_parts(memory: MemoryEstimate, batch_size: int) -> str:
    parts = ", ".join(f"{name} {fmt_bytes(n * batch_size)}" for name, n in memory.parts.items() if n)
    return parts or "nothing"


def explain_patch(patch: Sequence[PatchSpec], source: str) -> list[str]:
    """The lines a patch clause adds."""
    if not patch:
        return []
    runs = "corrupt" if source == "clean" else "clean"
    return [f"patch from {source}: the {runs} prompts run; per batch one more forward (no grad) of their {source} "
            "prompts takes the activations, written in at positions aligned from the end:",
            *(f"  {spec}" for spec in patch)]


def explain_forward_only(query, *, n_prompts: int, batch_size: int, patch: Sequence[PatchSpec] = ()) -> str:
    """Logits, the lens, upvoted tokens, routes: one no-grad forward pass per batch."""
    n_batches = -(-n_prompts // batch_size)
    lines = [f"{query.kind}: {n_prompts} prompt(s) in {n_batches} batch(es) of up to {batch_size}; one forward "
             "pass per batch under no_grad, no backward pass"]
    ablations = getattr(query, "ablations", ())
    if ablations:
        lines.append("ablations: " + ", ".join(_ablation_text(a) for a in ablations))
    return "\n".join(lines + explain_patch(patch, query.patch.source if patch else ""))


def explain_generate(query, *, n_prompts: int, patch: Sequence[PatchSpec], steers: Sequence) -> str:
    how = "greedy (the most likely token)" if query.temperature == 0 else (
        f"sampled at temperature {query.temperature}" + (f", seed {query.seed}" if query.seed is not None else ""))
    lines = [f"generate {query.n}: {n_prompts} prompt(s), each alone: one forward of the prompt under every "
             f"intervention, filling a KV cache, then {query.n - 1} one-token forward(s) against the cache; "
             f"{how}; no backward pass",
             "at the appended tokens only the ablations and steers that name no position apply"]
    if query.ablations:
        lines.append("ablations: " + ", ".join(_ablation_text(a) for a in query.ablations))
    lines += [f"steer: {spec}" for spec in steers]
    return "\n".join(lines + explain_patch(patch, query.patch.source if patch else ""))


def explain_metric(query, *, n_prompts: int, batch_size: int, pairs: bool, patch: Sequence[PatchSpec]) -> str:
    n_batches = -(-n_prompts // batch_size)
    per_batch = ["the clean prompts"] + (["their corrupt prompts"] if pairs else [])
    if patch or query.ablations:
        per_batch.append("the prompts that run under the interventions" + (" (after a forward of the patch's "
                                                                         "source prompts)" if patch else ""))
    forwards = n_batches * (len(per_batch) + (1 if patch else 0))
    lines = [f"metric: {n_prompts} prompt(s) in {n_batches} batch(es) of up to {batch_size}",
             f"per batch, forwards (no grad, logits at the last token only) of: {', '.join(per_batch)}",
             f"forwards in all: {forwards}; no backward pass"
             + (f"; then {query.over_prompts} over prompts" if query.over_prompts else "")]
    if query.ablations:
        lines.append("ablations: " + ", ".join(_ablation_text(a) for a in query.ablations))
    return "\n".join(lines + explain_patch(patch, query.patch.source if patch else ""))


def explain_sweep(query, *, n_pairs: int, variants: int, batch_size: int, cached: list[str], cache_bytes: int,
                  memory: MemoryEstimate) -> str:
    """A patching sweep: per pair a source forward (the cache), a baseline, the variant batches."""
    runs = "corrupt" if query.source == "clean" else "clean"
    per_pair = -(-variants // max(n_pairs, 1))
    batches = -(-per_pair // batch_size) if per_pair else 0
    lines = [
        f"patching of {query.of} from {query.source}: {n_pairs} pair(s), {variants} patched variant(s) in all "
        f"(about {per_pair} per pair)",
        f"per pair: a forward of the {query.source} prompt caching {', '.join(cached) or 'nothing'} "
        f"({fmt_bytes(cache_bytes)}), a forward of the {runs} prompt (its baseline), then the variants, "
        f"{batches} batch(es) of up to {batch_size} copies of the {runs} prompt, each copy with one component "
        "taken from the cache",
        f"forwards in all: {n_pairs * (2 + batches)}; no backward pass; logits at the last token only",
        f"estimated peak memory per variant batch: {fmt_bytes(memory.peak(batch_size) + cache_bytes)} "
        f"(weights {fmt_bytes(memory.weights)})",
    ]
    if query.ablations:
        lines.append("ablations (on the prompt that runs): " + ", ".join(_ablation_text(a) for a in query.ablations))
    if query.over_prompts:
        lines.append(f"then {query.over_prompts} over pairs; recovered from the reduced metrics")
    return "\n".join(lines)


def explain_verify(plan: NodePlan, n_rows: int, batch_size: int) -> str:
    how = ("patched from the clean prompt into the corrupt run" if plan.scalars[0] == "attrib_patch"
           else "set to zero in the clean run")
    return (f"verify: after the ranking, each of up to {n_rows} ranked nodes {how} alone; per prompt a baseline "
            f"forward and batches of up to {batch_size} copies (no grad); actual_effect beside {plan.scalars[0]}, "
            "and their Spearman rank correlation")


def _ablation_text(ablation) -> str:
    node = ablation.node
    index = "" if node.index is None else f",{node.index}"
    at = "" if node.token is None else f"@{node.token}" + ("" if node.key is None else f":{node.key}")
    return f"{node.component}[{node.layer}{index}]{at}={ablation.value}"
