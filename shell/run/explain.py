"""`tdbql run ... --explain`: the run's plan without running it.

The dataset and its shards, the engine and its workers, per worker (actor) the batch size and
the estimated peak memory (the model's weights and one batch, for the first shard's prompts),
then each query's own `explain` over the first shard and how its table combines across shards.
It loads the model here, in this process, to bind and estimate; it starts no Ray.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...executor.explain import fmt_bytes
from ...query.bind import bind_query
from ...query.plan import NodeQuery
from .driver import RunOptions, config_for, prepare
from .queries import MERGE_WORDS
from .shards import RESUME_KEYS, Manifest
from .worker import ShardRunner


def explain_run(options: RunOptions) -> str:
    prep = prepare(options)
    shards, total = prep.shards, sum(s.rows for s in prep.shards)
    sizes = sorted({s.rows for s in shards})
    lines = [f"run over '{options.prompts}': {len(prep.files)} file{'s' if len(prep.files) != 1 else ''}, "
             f"{total:,} prompts; {len(shards)} shard{'s' if len(shards) != 1 else ''} of up to "
             f"{options.shard_rows:,} prompts (sizes {', '.join(f'{n:,}' for n in sizes[:4])}"
             f"{', ...' if len(sizes) > 4 else ''}); prompt ids are row numbers in the dataset",
             _resume_line(options, prep)]
    runner = ShardRunner(replace(config_for(options, prep, "explain"), on_error="skip"))
    try:
        session = runner.session
        shard = shards[0]
        rows, _, _ = runner.prompts(runner.read(shard))
        session.set_prompts(rows)
        engine = session._engine()
        weights = sum(p.numel() * p.element_size() for p in session.loaded.model.parameters())
        batch, peak, parts = 0, 0, []
        for query, stmt in zip(prep.run_file.queries, runner.bound):
            bound = bind_query(stmt, query.span, session_loss=session.loss, source=prep.text,
                               prompts_have_targets=all(p.target for p in rows),
                               prompts_have_pairs=all(p.corrupt is not None for p in rows))
            plan = engine.plan(bound, rows) if isinstance(bound.query, NodeQuery) else None
            size = engine.plan_batch_size(plan, rows)
            estimate = engine.estimate_memory(plan, rows)
            batch, peak = max(batch, size), max(peak, estimate.peak(size))
            text = engine.explain(bound, rows)
            parts.append(f"query {query.index} ({', '.join(query.tables)}): {MERGE_WORDS[query.merge]}\n"
                         + "\n".join("  " + line for line in text.splitlines()))
        longest = max(len(ids) for ids in (session.loaded.encode(r.text) for r in rows))
    finally:
        runner.close()
    lines.append(_engine_line(options))
    how = ("--batch-size" if options.batch_size else "set batch_size in the run file" if session.settings.batch_size
           else "auto: from the memory budget")
    lines.append(f"per worker: the model loaded once ({fmt_bytes(weights)} of weights), batches of {batch} prompts "
                 f"({how}), about {fmt_bytes(peak)} at the peak (weights and one batch, estimated on the first "
                 f"shard's prompts, up to {longest} tokens)")
    return "\n".join(lines + parts)


def _engine_line(options: RunOptions) -> str:
    if options.engine == "local":
        return f"engine: local, one worker in this process on {options.resolved_device}"
    where = options.address or "a local Ray started with this machine's cores"
    each = f"{options.cpus_per_worker:g} CPU and {options.gpus_per_worker:g} GPU each"
    count = (f"{options.workers} workers" if options.workers
             else "one worker per " + ("GPU" if options.gpus_per_worker else "core") + " Ray offers")
    return f"engine: ray at {where}, {count} ({each}), a Ray Data actor pool; shards run whole, one per task"


def _resume_line(options: RunOptions, prep) -> str:
    out = Path(options.out)
    manifest = Manifest.load(out) if out.exists() else None
    if manifest is None:
        return f"output: {out}, new: all {len(prep.shards)} shards run"
    if any(manifest.data.get(k) != prep.header.get(k) for k in RESUME_KEYS):
        return f"output: {out} holds another run: the run would stop (give another --out)"
    done = len(manifest.shards)
    return f"output: {out}, {done} of {len(prep.shards)} shards committed: {len(prep.shards) - done} to run"
