"""The engine: a bound query (query/bind.py) over the prompt set -> Arrow tables.

    engine = Engine(loaded)
    engine.run(bound, prompts) -> {"result": pyarrow.Table}     # routes: route_nodes, route_edges
    engine.explain(bound, prompts) -> str

One `visit_<Query>` per query kind. A node query is planned (physical.py), then per batch of
right-padded prompts: (once, before everything, a forward pass over the prompt set for `=mean`
ablation values), the plan's passes (passes.py), one block of node values per (component, layer)
derived lazily (blocks.py), reduced on the device by a sink (reduce.py), and turned into Arrow
(arrow.py). Logits, the logit lens and upvoted tokens are one forward pass per batch without
autograd; routes are LLM-TT's graph (routes.py). The engine trusts the binder: it does not check
names or ranges again; data-dependent faults (a token beyond a prompt's end) are reported as
they are met.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import pyarrow as pa
import torch

from ..query.context import PromptRow
from ..query.errors import TdbqlError
from ..query.plan import BoundQuery, LogitsQuery
from . import lens, routes
from .ablation import ablation_means, ablation_spec, needs_means
from .arrow import logit_table, node_table
from .blocks import logit_rows, node_blocks
from .compiled import CompiledPasses, refusal
from .conditions import and_mask, scalar_mask
from .explain import explain_forward_only, explain_generate, explain_metric, explain_plan, explain_sweep
from .generate import generate_table
from .interventions import Interventions, Patcher, patch_specs
from .memory import (
    MemoryEstimate,
    admit,
    available_memory,
    batch_size_for,
    default_budget,
    estimate_memory,
    raw_numel,
    with_results,
)
from .pairs import side
from .patching import metric_table, sweep_table, sweep_variants
from .physical import NodePlan, plan_node_query
from .reduce import OverPromptsSink, SelectSink, TopKSink, group_ids, lexsort, take
from .runtime.batching import batches, check_pairs, encode_prompts
from .runtime.hooks import HookSet
from .scalars import Raw, Weights
from .steering import steer_specs
from .verify import add_actual_effect

SMALL_MODEL_WORK = 5 * 10**8  # parameters x 64 tokens x 8 prompts below which one CPU thread is faster


def use_threads_for(loaded) -> None:
    """Set torch's CPU threads once for a session's model: one for small models (a REPL query on
    the embedded model), whose matmuls take microseconds while a parallel region waits for every
    thread (measured: a 4-layer d_model-128 query took 1.35 s with 2 threads on 2 contended cores,
    37 ms with one); larger models keep torch's default."""
    if loaded.device.type != "cpu":
        return
    params = sum(p.numel() for p in loaded.model.parameters())
    if params * 64 * 8 <= SMALL_MODEL_WORK:
        torch.set_num_threads(1)


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
        memory_limit: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.batch_size = batch_size
        self.progress = progress
        self.freeze_ln_f = freeze_ln_f
        self.memory_budget = memory_budget
        self.memory_limit = memory_limit  # bytes a query may add (None: what the machine has left)
        self.compiled = CompiledPasses(loaded) if compile else None
        self.weights = Weights(loaded.model, loaded.saes)

    # -- entry points --

    def run(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        if not isinstance(bound, BoundQuery):
            raise TypeError("Engine.run takes a BoundQuery (query/bind.py: bind, then bind_query)")
        if not prompts:
            raise TdbqlError("no prompts: add one with `prompt \"...\"` or `prompts from ...`")
        return getattr(self, f"visit_{type(bound.query).__name__}")(bound, prompts)

    def explain(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> str:
        query = bound.query
        if query.kind == "patching":
            return self._explain_sweep(query, prompts)
        rows, _ = self.interventions(bound, prompts, means=False)
        patch = patch_specs(getattr(query, "patch", None))
        if query.kind == "generate":
            steers = steer_specs(self.loaded, query.steers, prompts, self.plan_batch_size(None, prompts))
            return explain_generate(query, n_prompts=len(rows), patch=patch, steers=steers)
        if query.kind == "metric":
            return explain_metric(query, n_prompts=len(prompts), batch_size=self.plan_batch_size(None, prompts),
                                  pairs=all(p.corrupt is not None for p in prompts), patch=patch)
        if query.kind != "nodes":
            return explain_forward_only(query, n_prompts=len(rows), batch_size=self.plan_batch_size(None, rows),
                                        patch=patch)
        plan = self.plan(bound, rows)
        rows = paired_rows(plan, rows)
        batch_size = self.plan_batch_size(plan, rows)
        memory = self.estimate_memory(plan, rows)
        kept = sum(raw_numel(self.loaded, r, memory.n_tokens) for r in plan.raws)
        kept *= torch.finfo(self.loaded.dtype).bits // 8 * batch_size
        return explain_plan(plan, memory=memory, batch_size=batch_size, n_prompts=len(rows), kept_bytes=kept,
                            path=self._path(plan))

    def _explain_sweep(self, query, prompts: Sequence[PromptRow]) -> str:
        run_side = "corrupt" if query.source == "clean" else "clean"
        lengths = [(len(self.loaded.encode(r.text)), len(self.loaded.encode(s.text)))
                   for r, s in zip(side(prompts, run_side), side(prompts, query.source))]
        variants = [sweep_variants(query, self.loaded.config, self.loaded.saes, n_run, n_source)
                    for n_run, n_source in lengths]
        cached = sorted({(v.location, v.layer) for v in variants[0]}, key=lambda x: (x[1], x[0])) if variants else []
        n_source = max((n for _, n in lengths), default=1)
        element = torch.finfo(self.loaded.dtype).bits // 8
        cache_bytes = sum(raw_numel(self.loaded, Raw(location, layer), n_source) for location, layer in cached)
        batch_size = self.plan_batch_size(None, prompts)
        names = [f"{location}[{layer}]" for location, layer in cached]
        return explain_sweep(query, n_pairs=len(prompts), variants=sum(len(v) for v in variants),
                             batch_size=batch_size, cached=names, cache_bytes=cache_bytes * element,
                             memory=self.estimate_memory(None, prompts))

    def _path(self, plan: NodePlan) -> str:
        if self.compiled is None:
            return "execution: eager (set compile = on for torch.compile)"
        why_not = refusal(plan)
        if why_not is not None:
            return f"execution: eager (compile does not cover a {why_not})"
        return "execution: torch.compile, one graph per batch shape (zero probes give the gradients)"

    # -- planning --

    def plan(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> NodePlan:
        plan = plan_node_query(bound, self.loaded.config, saes=self.loaded.saes, freeze_ln_f=self.freeze_ln_f)
        if plan.pairs:
            rows = paired_rows(plan, prompts)
            check_pairs(rows, encode_prompts(self.loaded, rows))
        return plan

    def estimate_memory(self, plan: NodePlan | None, prompts: Sequence[PromptRow]) -> MemoryEstimate:
        n_tokens = max((len(ids) for ids in encode_prompts(self.loaded, prompts)), default=1)
        return estimate_memory(self.loaded, plan, n_tokens)

    def plan_batch_size(self, plan: NodePlan | None, prompts: Sequence[PromptRow]) -> int:
        """`batch_size` when given, else what the memory budget allows; even for pairs."""
        pairs = plan is not None and plan.pairs
        if self.batch_size:
            size = max(1, self.batch_size)
            return size + 1 if pairs and size % 2 else size
        budget = self.memory_budget or default_budget(self.loaded.device)
        return batch_size_for(self.estimate_memory(plan, prompts), budget, pairs=pairs)

    def admit(self, plan: NodePlan, prompts: Sequence[PromptRow], batch_size: int) -> int:
        """Memory admission (memory.py): the batch size to run with, or a TdbqlError before any work."""
        lengths = [len(ids) for ids in encode_prompts(self.loaded, prompts)]
        memory = with_results(estimate_memory(self.loaded, plan, max(lengths, default=1)), self.loaded, plan,
                              lengths, [p.prompt_id for p in prompts])
        auto, device = not self.batch_size, self.loaded.device
        batch_size = min(batch_size, max(len(prompts), 1))  # batches never hold more than the prompt set
        if self.memory_limit:
            return admit(memory, batch_size, limit=self.memory_limit, source="of memory_limit", auto=auto,
                         pairs=plan.pairs)
        if device.type == "cuda":  # the batches on the device, the results on the host
            host, source = available_memory(torch.device("cpu"))
            admit(replace(memory, per_prompt=0), batch_size, limit=host, source=source, auto=False)
            memory = replace(memory, sink=0, stored=0, result_rows=0)
        limit, source = available_memory(device)
        return admit(memory, batch_size, limit=limit, source=source, auto=auto, pairs=plan.pairs)

    # -- interventions: ablations, and the patch clause's prompt pairs --

    def interventions(self, bound: BoundQuery, prompts: Sequence[PromptRow], *,
                      means: bool = True) -> tuple[list[PromptRow], Interventions]:
        """The prompts that run (the other side of each pair under a patch) and the hooks every
        pass over them adds: the ablations (with `=mean` values over those prompts, a forward over
        them, unless `means` is False) and the patch."""
        query = bound.query
        specs = tuple(ablation_spec(a) for a in getattr(query, "ablations", ()))
        patch = getattr(query, "patch", None)
        patcher = Patcher(self.loaded, patch_specs(patch), prompts, patch.source) if patch is not None else None
        rows = patcher.run_rows if patcher is not None else list(prompts)
        values, steers = {}, ()
        if means and needs_means(specs):
            values = ablation_means(self.loaded, specs, rows, self.plan_batch_size(None, rows))
        if means and getattr(query, "steers", ()):
            steers = steer_specs(self.loaded, query.steers, prompts, self.plan_batch_size(None, prompts))
        return rows, Interventions(specs, values, patcher, steers)

    # -- node queries --

    def visit_NodeQuery(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        rows, edits = self.interventions(bound, prompts)
        plan = self.plan(bound, rows)
        rows = paired_rows(plan, rows)
        query = plan.query
        batch_size = self.admit(plan, rows, self.plan_batch_size(plan, rows))
        sink = SelectSink() if query.mode == "select" else TopKSink(
            query.k, plan.scalars[0], bottom=query.mode == "bottomk", by=tuple(query.by))
        over = OverPromptsSink(query.over_prompts, plan.relative_positions) if query.over_prompts else None
        n_batches = math.ceil(len(rows) / batch_size)
        for i, batch in enumerate(batches(self.loaded, rows, max_prompts=batch_size, pairs=plan.pairs)):
            for block in node_blocks(self.loaded, plan, batch, edits, self.weights, compiled=self.compiled):
                if over is not None:
                    over.add(block, batch.lengths)
                else:
                    sink.add(block)
            if self.progress:
                self.progress(i + 1, n_batches)
        if over is not None:
            for block in over.finish():
                block.mask = and_mask(block.mask, scalar_mask(query.where, block.values, block.mask.device))
                sink.add(block)
        result = sink.result()
        if result is not None and "rank" in result:
            result = take(result, lexsort([group_ids(result, tuple(query.by)), result["rank"]]))
        table = node_table(result, plan.scalars, self.loaded.token_str)
        if query.verify:
            table = add_actual_effect(self.loaded, table, plan, prompts, edits, self.plan_batch_size(None, prompts))
        return {"result": table}

    # -- logits, lenses, routes: one forward pass per batch, no autograd --

    def visit_LogitsQuery(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        query: LogitsQuery = bound.query
        rows, edits = self.interventions(bound, prompts)
        parts = []
        for batch in batches(self.loaded, rows, max_prompts=self.plan_batch_size(None, rows)):
            hooks = HookSet()
            edits.add(hooks, batch)
            with torch.no_grad():
                logits = self.loaded.model(batch.input_ids, batch.attention_mask, hooks)
            parts.append(logit_rows(query, batch, logits))
        parts = [p for p in parts if p is not None]
        result = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else None
        return {"result": logit_table(result, self.loaded.token_str, logprobs=query.logprobs)}

    def visit_LogitLensQuery(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        rows, edits = self.interventions(bound, prompts)
        return {"result": lens.logit_lens(self.loaded, bound.query, rows, add_hooks=edits.add if edits else None)}

    def visit_UpvotedQuery(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        return {"result": lens.upvoted(self.loaded, bound.query, prompts)}

    def visit_RoutesQuery(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        rows, edits = self.interventions(bound, prompts)
        return routes.routes(self.loaded, bound.query, rows, add_hooks=edits.add if edits else None)

    def visit_GenerateQuery(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        rows, edits = self.interventions(bound, prompts)
        return {"result": generate_table(self.loaded, bound.query, rows, edits, self.progress)}

    # -- the metric and patching sweeps --

    def visit_MetricQuery(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        _, edits = self.interventions(bound, prompts)
        return {"result": metric_table(self.loaded, bound.query, bound.loss, list(prompts), edits,
                                       self.plan_batch_size(None, prompts))}

    def visit_PatchingQuery(self, bound: BoundQuery, prompts: Sequence[PromptRow]) -> dict[str, pa.Table]:
        _, edits = self.interventions(bound, prompts)
        table = sweep_table(self.loaded, bound.query, bound.loss, list(prompts), edits,
                            self.plan_batch_size(None, prompts), self.progress)
        return {"result": table}


def paired_rows(plan: NodePlan, rows: Sequence[PromptRow]) -> list[PromptRow]:
    """The prompts a pair-reading plan (attrib_patch) runs: each clean prompt followed by its
    corrupt one when every prompt has one, else the prompt set as consecutive pairs."""
    if plan.pairs and rows and all(r.corrupt is not None for r in rows):
        return [r for pair in zip(rows, side(rows, "corrupt")) for r in pair]
    return list(rows)


__all__ = ["Engine", "use_threads_for"]
