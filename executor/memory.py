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
  block (token x key x unit) in fp32 per scalar, and the sink's temporaries (REDUCE_TEMPORARIES).

Peak per prompt = max(passes: saved + logits + captured + grads + working, derivation:
captured + grads + reduction). Ignored: the autograd graph's metadata, allocator fragmentation,
and the saved tensors freed while the backward runs (so the figure is an upper bound on the
tensors, not on the process's RSS).

Beside the batches, a query keeps its result rows across all of them (`results`, independent of
the batch size): `select` every node the field conditions keep (scalar conditions cannot be known
ahead, so the count is an upper bound), `topk` K per group. A row costs, measured on the
process's RSS (tests/executor/test_memory_admission.py): the sink's int64 ids and fp32 scalars,
beside the last batch, then held about four times over by `select` once the batches are done
(the per-batch parts, their concatenation, the canonical order's copy and its sort keys, in the
memory the batches freed), and to the end the Arrow table and DuckDB's copy of it, each about the
Arrow row's size. `over prompts` keeps one fp64 accumulator per node and scalar. A top-k grouped
`by prompt` or `by token` over autoencoder latents gathers, per batch, every latent tied at zero
with its group's k-th value (reduce.TopKSink's prefilter keeps ties): counted per prompt.

Admission (`admit`): before a query runs, its batches plus its results must fit the memory the
process may still take (RAM: MemAvailable or the cgroup's room; CUDA: the device's free memory,
for the batches), less a margin, or `set memory_limit`. An automatic batch size shrinks to fit
first; what cannot fit is refused with the estimate, the limit and the knobs that shrink it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..query.errors import TdbqlError
from .conditions import ids_kept, positions_kept, static_conditions_pass
from .physical import NodePlan
from ..query.catalog import COMPONENTS
from .runtime.hooks import location_shape
from .scalars import Raw, Site

# shapes (per prompt) of the contribution locations the pass fills (they are not hook points)
_CONTRIBUTION_DIMS = {"contrib.attn": ("token", "key", "head"), "contrib.mlp": ("token", "one", "d_mlp")}
MAX_AUTO_BATCH = 64
SINK_IDS = 9  # int64 columns of a sink row (reduce.block_rows)
NODE_ARROW_ROW = 71  # bytes of a node table row without its scalars: six int64s, three short strings
SELECT_COPIES = 4  # how many times `select` holds the sink rows at its peak (module docstring)
TOPK_COPIES = 2  # a running top-k's state and the merge of its candidates
TOPK_PENDING = 16_384  # reduce.TopKSink.PRUNE_AT
MEMINFO, CGROUP = Path("/proc/meminfo"), Path("/sys/fs/cgroup")
MARGIN = 256 << 20  # bytes left to everything else, at least; 10% of what is available above that


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of a query's batches (see the module docstring for what is counted)."""

    weights: int  # model and autoencoder parameters, bytes
    per_prompt: int  # bytes one prompt adds to a batch
    n_tokens: int  # real tokens of the longest prompt (the padded width)
    parts: dict[str, int]  # per-prompt bytes: saved, logits, captured, grads, working, reduction
    result_rows: int = 0  # rows the query keeps (an upper bound under scalar conditions)
    sink: int = 0  # bytes of those rows as the sink holds them, once
    sink_copies: int = 1  # how many times over the sink holds them at its peak
    stored: int = 0  # bytes kept to the end: the Arrow table, DuckDB's copy, over-prompts accumulators

    def peak(self, batch_size: int) -> int:
        """The weights and one batch's tensors."""
        return self.weights + batch_size * self.per_prompt

    @property
    def results(self) -> int:
        return self.sink * self.sink_copies + self.stored

    def need(self, batch_size: int) -> int:
        """What running the query adds to the process: the last batch beside the rows gathered so
        far, or the sink's copies once the batches are done (their memory is reused), and what is
        stored."""
        return max(batch_size * self.per_prompt + self.sink, self.sink * self.sink_copies) + self.stored


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
        "working": _working_numel(loaded, T, plan) * element * (2 if plan and plan.needs_jvp else 1),
        "reduction": _reduction_bytes(loaded, plan, T),
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


def _working_numel(loaded, T: int, plan: NodePlan | None) -> int:
    """One layer's transient intermediates for one prompt, an attached autoencoder's included
    (its pre-activation, latents, reconstruction and error)."""
    c = loaded.config
    eager = plan is not None and bool(plan.eager_layers)
    attention = 2 * c.n_heads * T if eager else c.n_heads * c.d_head
    autoencoder = max((2 * ae.n_latents + 2 * ae.d_in for ae in loaded.saes.values()), default=0)
    return T * (attention + 2 * c.d_mlp + 4 * c.d_model + autoencoder)


# bytes per node of the block being reduced, besides its fp32 scalars: the sink's score, its
# NaN-free negation and the masks it builds (reduce.TopKSink.add, blocks.py's masks)
REDUCE_TEMPORARIES = 20


def _reduction_bytes(loaded, plan: NodePlan | None, T: int) -> int:
    if plan is None or not plan.sites:
        return 0
    largest = max(block_numel(loaded, p.site, T) for p in plan.sites)
    return largest * (4 * len(plan.scalars) + REDUCE_TEMPORARIES)


# --- the results a query keeps across batches --------------------------------------------------------


def with_results(memory: MemoryEstimate, loaded, plan: NodePlan, lengths: Sequence[int],
                 prompt_ids: Sequence[int]) -> MemoryEstimate:
    """`memory` with the node query's result rows and their bytes (module docstring)."""
    query = plan.query
    rows = node_rows(loaded, plan, lengths, prompt_ids)
    s = len(plan.scalars)
    sink_row, arrow_row = SINK_IDS * 8 + 4 * s, NODE_ARROW_ROW + 8 * s
    T = max(lengths, default=1)
    stored = sum(block_numel(loaded, p.site, T) for p in plan.sites) * 8 * (s + 1) if query.over_prompts else 0
    per_prompt = memory.per_prompt
    if query.mode == "select":
        sink, copies = rows * sink_row, SELECT_COPIES
    else:
        rows = min(rows, query.k * n_groups(plan, lengths, prompt_ids))
        sink, copies = (rows + TOPK_PENDING) * sink_row, TOPK_COPIES
        if {"prompt", "token"} & set(query.by):  # every latent tied at 0 with the k-th of a small group
            latents = [block_numel(loaded, p.site, T) for p in plan.sites if COMPONENTS[p.site.kind].unit == "latent"]
            per_prompt += max(latents, default=0) * sink_row * SELECT_COPIES
    return replace(memory, per_prompt=per_prompt, result_rows=rows, sink=sink, sink_copies=copies,
                   stored=stored + rows * 2 * arrow_row)


def node_rows(loaded, plan: NodePlan, lengths: Sequence[int], prompt_ids: Sequence[int]) -> int:
    """Rows the field conditions keep (layer, component, token, attended, head, unit, prompt),
    summed over prompts (one prompt of the longest length under `over prompts`)."""
    where = plan.query.where
    kept = set(ids_kept(where, "prompt", torch.tensor(list(prompt_ids), dtype=torch.long)).tolist())
    counted = [n for i, (n, pid) in enumerate(zip(lengths, prompt_ids)) if pid in kept and not (plan.pairs and i % 2)]
    if plan.query.over_prompts:
        counted = [max(counted)] if counted else []
    per_length: dict[int, int] = {}
    for n in counted:
        per_length[n] = per_length.get(n, 0) + 1
    total = 0
    for p in plan.sites:
        if static_conditions_pass(where, p.site.kind, p.site.layer):
            units = _units_kept(loaded, p.site, where)
            total += sum(count * _positions(where, p.site.kind, n) * units for n, count in per_length.items())
    return total


def _positions(where, kind: str, n: int) -> int:
    """(token) or (token, key u <= token) positions of a prompt of n tokens the conditions keep."""
    tokens = positions_kept(where, "token", n)
    if kind != "attn":
        return 0 if any(c.field == "attended" for c in where) else tokens.numel()
    keys = positions_kept(where, "attended", n)
    return int(torch.searchsorted(keys, tokens, right=True).sum())


def _units_kept(loaded, site: Site, where) -> int:
    unit = COMPONENTS[site.kind].unit
    n = block_numel(loaded, site, 1) if site.kind != "attn" else loaded.config.n_heads
    for field in ("head", "unit"):
        if any(c.field == field for c in where):
            if (unit != "head") if field == "head" else (unit is None):
                return 0
            n = ids_kept(where, field, torch.arange(n)).numel()
    return n


def n_groups(plan: NodePlan, lengths: Sequence[int], prompt_ids: Sequence[int]) -> int:
    by = plan.query.by
    sites = [p.site for p in plan.sites]
    sizes = {"layer": len({s.layer for s in sites}), "component": len({s.kind for s in sites}),
             "token": max(lengths, default=1), "prompt": 1 if plan.query.over_prompts else len(prompt_ids)}
    return math.prod(sizes[key] for key in by)


# --- admission --------------------------------------------------------------------------------------


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes the process may still take on `device`'s host (CPU: the smaller of MemAvailable and
    the cgroup's room; CUDA: the device's free memory), less a margin; and where that comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room, source = free, f"free on {device}"
    else:
        room, source = _meminfo("MemAvailable"), "available (MemAvailable)"
        cgroup = _cgroup_room()
        if cgroup is not None and cgroup < room:
            room, source = cgroup, "left under the cgroup's memory limit"
    return max(0, room - max(MARGIN, room // 10)), f"{source}, less a margin"


def admit(memory: MemoryEstimate, batch_size: int, *, limit: int, source: str, auto: bool,
          pairs: bool = False) -> int:
    """The batch size to run with (an automatic one shrunk to fit); a TdbqlError naming the
    estimate, the limit and the knobs when the query cannot fit."""
    if memory.need(batch_size) <= limit:
        return batch_size
    fits = (limit - memory.sink - memory.stored) // max(memory.per_prompt, 1)
    fits = min(fits, batch_size)
    if auto and fits >= (2 if pairs else 1) and memory.need(int(fits)) <= limit:
        return int(fits - fits % 2) if pairs else int(fits)
    rows = f"{memory.result_rows:,} result rows: {fmt_bytes(memory.results)}; " if memory.results else ""
    raise TdbqlError(
        f"this query would need about {fmt_bytes(memory.need(batch_size))} ({rows}batches of {batch_size} "
        f"prompts: {fmt_bytes(batch_size * memory.per_prompt)}), more than the {fmt_bytes(limit)} {source}; "
        "make it smaller with `where` (fewer layers, tokens, heads, units or prompts), `topk` instead of "
        "`select`, fewer `by` keys, or a smaller `set batch_size`; or `set memory_limit = '16GB'` to allow more")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _meminfo(key: str) -> int:
    for line in MEMINFO.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_room() -> int | None:
    """The cgroup's limit less its usage (inactive file cache counted as free), v2 or v1."""
    for limit, usage, stat, inactive in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        try:
            cap = (CGROUP / limit).read_text().strip()
            used = int((CGROUP / usage).read_text())
            stats = dict(line.split() for line in (CGROUP / stat).read_text().splitlines())
        except (OSError, ValueError):
            continue
        if cap == "max" or int(cap) >= 1 << 60:
            return None
        return int(cap) - used + int(stats.get(inactive, 0))
    return None
