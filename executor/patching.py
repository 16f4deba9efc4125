"""The metric statement and patching sweeps: forwards without autograd, read at the last token.

metric: per prompt, the target (logit difference or logprob at the last token, as the loss of a
node query) on the clean prompt, on its corrupt prompt (pairs), and under the statement's
interventions (`metric`): the ablations on the clean prompt, or, with a patch, on the prompt that
runs.

patching sweeps: for each pair, one forward of the source prompt caching every activation the
sweep patches, one forward of the running prompt (its baseline, under the statement's
ablations), then the patched variants, each a copy of the running prompt with one component
(and position) taken from the source, many copies to a batch:

    recovered = (metric_patched - metric_corrupt) / (metric_clean - metric_corrupt)   from clean
    recovered = (metric_patched - metric_clean) / (metric_corrupt - metric_clean)     from corrupt

so 1 means the component alone carries the whole difference. `over prompts` reduces the three
metrics over pairs and computes `recovered` from the reduced values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..query.catalog import SWEEPS, latent_component
from ..query.context import PromptRow
from ..query.plan import Loss, MetricQuery, PatchingQuery
from .arrow import METRIC_SCHEMA, PATCHING_SCHEMA, floats, ints, repeat, token_strings
from .conditions import ids_kept, positions_kept, token_conditions_relative
from .interventions import Edits, Interventions, capture, write
from .losses import prompt_losses
from .pairs import other, side
from .reduce import NULL
from .runtime.batching import Batch, encode_prompts, pad
from .runtime.hooks import HookSet


def padded(loaded, rows: Sequence[PromptRow], what: str = "prompt") -> Batch:
    return pad(list(rows), encode_prompts(loaded, rows, what=what), 0, loaded.device)


def metric_of(loaded, loss: Loss | None, batch: Batch, hooks: HookSet | None = None) -> torch.Tensor:
    """The target per prompt of `batch` (one forward, no autograd), under `hooks`."""
    last = capture(loaded, batch, (), hooks)["last_logits"]
    return prompt_losses(loaded.encode, loss, batch.rows, last).double()


def variant_metrics(loaded, loss: Loss | None, run_row: PromptRow, variants: Sequence, batch_size: int,
                    edits: Interventions, add_variants: Callable[[HookSet, Sequence], None],
                    what: str = "prompt") -> Iterator[torch.Tensor]:
    """The metric of copies of `run_row`, `batch_size` to a forward, copy r of each batch under
    the statement's edits and what `add_variants(hooks, chunk)` hooks in for chunk[r]."""
    for start in range(0, len(variants), batch_size):
        chunk = variants[start:start + batch_size]
        copies = padded(loaded, [run_row] * len(chunk), what)
        hooks = HookSet()
        edits.add(hooks, copies)
        add_variants(hooks, chunk)
        yield metric_of(loaded, loss, copies, hooks)


# --- metric -------------------------------------------------------------------------------------------


def metric_table(loaded, query: MetricQuery, loss: Loss | None, prompts: Sequence[PromptRow],
                 edits: Interventions, batch_size: int) -> pa.Table:
    pairs = all(p.corrupt is not None for p in prompts)
    run_rows = edits.patcher.run_rows if edits.patcher is not None else list(prompts)
    columns: dict[str, list] = {"metric": [], "metric_clean": [], "metric_corrupt": []}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        clean = metric_of(loaded, loss, padded(loaded, chunk))
        corrupt = metric_of(loaded, loss, padded(loaded, side(chunk, "corrupt"), "corrupt prompt")) if pairs else None
        if edits:
            run = padded(loaded, run_rows[start:start + batch_size])
            hooks = HookSet()
            edits.add(hooks, run)
            intervened = metric_of(loaded, loss, run, hooks)
        else:
            intervened = clean
        columns["metric"].append(intervened)
        columns["metric_clean"].append(clean)
        columns["metric_corrupt"].append(corrupt if corrupt is not None else torch.full_like(clean, float("nan")))
    values = {name: torch.cat(parts) for name, parts in columns.items()}
    prompt_ids = torch.tensor([p.prompt_id for p in prompts])
    if query.over_prompts:
        values = {name: _reduce(v, query.over_prompts)[None] for name, v in values.items()}
        prompt_ids = None
    n = len(values["metric"])
    return pa.table({"prompt_id": ints(prompt_ids, n), **{name: floats(v) for name, v in values.items()}},
                    schema=METRIC_SCHEMA)


def _reduce(values: torch.Tensor, how: str) -> torch.Tensor:
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return {"mean": values.mean, "sum": values.sum, "max": values.max}[how]()


# --- sweeps -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One patched copy: (location, layer, unit) at `position` of the running prompt (None: every
    aligned position)."""

    component: str
    location: str
    layer: int
    unit: int | None
    position: int | None


def sweep_variants(query: PatchingQuery, cfg, saes, n_run: int, n_source: int) -> list[Variant]:
    """Every component (and position) the sweep patches for one pair, after `where`."""
    sweep = SWEEPS[query.of]
    layers = set(ids_kept(query.where, "layer", torch.arange(cfg.n_layers)).tolist())
    units: list[tuple[str, str, int, int | None]] = []  # (component, location, layer, unit)
    if sweep.unit == "latent":
        for site, layer in sorted(saes):
            name = latent_component(site)
            units += [(name, f"sae.{site}.latent", layer, i) for i in range(saes[(site, layer)].n_latents)]
    else:
        count = {"head": cfg.n_heads, "neuron": cfg.d_mlp}.get(sweep.unit)
        for layer in range(cfg.n_layers):
            units += [(sweep.name, sweep.location, layer, u) for u in (range(count) if count else [None])]
    units = [u for u in units if u[2] in layers and _unit_kept(query, u[3])]
    if "token" not in query.by:
        return [Variant(c, loc, layer, unit, None) for c, loc, layer, unit in units]
    aligned = range(max(0, n_run - n_source), n_run)
    positions = [t for t in positions_kept(query.where, "token", n_run).tolist() if t in aligned]
    return [Variant(c, loc, layer, unit, t) for c, loc, layer, unit in units for t in positions]


def _unit_kept(query: PatchingQuery, unit: int | None) -> bool:
    conditions = [c for c in query.where if c.field in ("unit", "head")]
    if not conditions:
        return True
    if unit is None:
        return False
    return all(bool(ids_kept((c,), c.field, torch.tensor([unit])).numel()) for c in conditions)


def sweep_table(loaded, query: PatchingQuery, loss: Loss | None, prompts: Sequence[PromptRow],
                edits: Interventions, batch_size: int, progress: Callable[[int, int], None] | None = None) -> pa.Table:
    source, run_side = query.source, other(query.source)
    prompt_ids = set(ids_kept(query.where, "prompt", torch.tensor([p.prompt_id for p in prompts])).tolist())
    chosen = [p for p in prompts if p.prompt_id in prompt_ids]
    relative = bool(query.over_prompts) and token_conditions_relative(query.where)
    parts = [_pair_rows(loaded, query, loss, pair, source, run_side, edits, batch_size, relative) for pair in
             _with_progress(chosen, progress)]
    table = pa.concat_tables(parts) if parts else PATCHING_SCHEMA.empty_table()
    if query.over_prompts:
        table = _over_prompts(table, query)
    return table.combine_chunks()


def _with_progress(pairs: list, progress) -> Iterator:
    for i, pair in enumerate(pairs):
        yield pair
        if progress:
            progress(i + 1, len(pairs))


def _pair_rows(loaded, query: PatchingQuery, loss, pair: PromptRow, source: str, run_side: str,
               edits: Interventions, batch_size: int, relative: bool) -> pa.Table:
    """One pair's rows; positions counted from the end when `relative` (over prompts of unequal
    lengths with `where token < 0`-style conditions, as node queries do)."""
    run_row, source_row = side([pair], run_side)[0], side([pair], source)[0]
    run, src = padded(loaded, [run_row], f"{run_side} prompt"), padded(loaded, [source_row], f"{source} prompt")
    n_run, n_source = int(run.lengths[0]), int(src.lengths[0])
    variants = sweep_variants(query, loaded.config, loaded.saes, n_run, n_source)
    cache = capture(loaded, src, {(v.location, v.layer) for v in variants})
    metric_source = float(prompt_losses(loaded.encode, loss, [source_row], cache["last_logits"])[0])
    hooks = HookSet()
    edits.add(hooks, run)
    metric_run = float(metric_of(loaded, loss, run, hooks)[0])

    def add_variants(hooks: HookSet, chunk: Sequence) -> None:
        for (location, layer), e in _variant_edits(chunk, n_run, n_source, run.input_ids.device).items():
            hooks.add(location, layer, _sweep_hook(location, e, cache[(location, layer)]))

    patched = list(variant_metrics(loaded, loss, run_row, variants, batch_size, edits, add_variants,
                                   f"{run_side} prompt"))
    metric_patched = torch.cat(patched) if patched else torch.zeros(0, dtype=torch.float64)
    clean, corrupt = (metric_source, metric_run) if source == "clean" else (metric_run, metric_source)
    return _rows(pair.prompt_id, variants, run_row, loaded, clean, corrupt, metric_patched, source, relative)


def _variant_edits(chunk: Sequence[Variant], n_run: int, n_source: int, device) -> dict[tuple[str, int], Edits]:
    """Row r of the batch patches chunk[r]'s component, from row 0 of the source, aligned from the end."""
    shift = n_source - n_run
    grouped: dict[tuple[str, int], list[tuple[int, int, int | None]]] = {}
    for r, v in enumerate(chunk):
        positions = [v.position] if v.position is not None else range(max(0, -shift), n_run)
        grouped.setdefault((v.location, v.layer), []).extend((r, t, v.unit) for t in positions)
    out = {}
    for key, items in grouped.items():
        rows, ts, units = zip(*items)
        tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        unit = None if units[0] is None else tensor(units)
        out[key] = Edits(tensor(rows), tensor(ts), torch.zeros(len(rows), dtype=torch.long, device=device),
                         tensor(ts) + shift, unit)
    return out


def _sweep_hook(location: str, e: Edits, source: torch.Tensor):
    def hook(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        write(x, location, e, source.to(x.dtype))
        return x

    return hook


def _rows(prompt_id: int, variants: list[Variant], run_row: PromptRow, loaded, clean: float, corrupt: float,
          patched: torch.Tensor, source: str, relative: bool) -> pa.Table:
    n = len(variants)
    ids = loaded.encode(run_row.text)
    token_ids = [ids[v.position] if v.position is not None else NULL for v in variants]
    positions = [None if v.position is None else v.position - (len(ids) if relative else 0) for v in variants]
    patched_np = patched.numpy()
    return pa.table({
        "prompt_id": repeat(prompt_id, n, "prompt_id"),
        "layer": ints([v.layer for v in variants]),
        "component": pa.array([v.component for v in variants], pa.string()),
        "unit": pa.array([v.unit for v in variants], pa.int64()),
        "position": pa.array(positions, pa.int64()),
        "token": token_strings(token_ids, loaded.token_str),
        "metric_clean": floats(np.full(n, clean)),
        "metric_corrupt": floats(np.full(n, corrupt)),
        "metric_patched": floats(patched_np),
        "recovered": floats(recovered(clean, corrupt, patched_np, source)),
    }, schema=PATCHING_SCHEMA)


def recovered(clean, corrupt, patched, source: str):
    """The share of the clean-vs-corrupt difference the patch restores (from clean) or removes
    (from corrupt); NaN where the two baselines are equal."""
    start, end = (corrupt, clean) if source == "clean" else (clean, corrupt)
    span = np.asarray(end, dtype=np.float64) - start
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(span != 0, (np.asarray(patched, dtype=np.float64) - start) / span, np.nan)


def _over_prompts(table: pa.Table, query: PatchingQuery) -> pa.Table:
    """Reduce the metrics over pairs per (layer, component, unit, position)."""
    how = {"mean": "mean", "sum": "sum", "max": "max"}[query.over_prompts]
    keys = ["layer", "component", "unit", "position"]
    grouped = table.group_by(keys, use_threads=False).aggregate(
        [(name, how) for name in ("metric_clean", "metric_corrupt", "metric_patched")]
        + [("token", "min"), ("token", "max")])
    clean = grouped.column(f"metric_clean_{how}").to_numpy(zero_copy_only=False)
    corrupt = grouped.column(f"metric_corrupt_{how}").to_numpy(zero_copy_only=False)
    patched = grouped.column(f"metric_patched_{how}").to_numpy(zero_copy_only=False)
    same_token = pc.equal(grouped.column("token_min"), grouped.column("token_max"))
    token = pc.if_else(same_token, grouped.column("token_min"), pa.scalar(None, pa.string()))
    n = grouped.num_rows
    out = pa.table({
        "prompt_id": ints(None, n),
        "layer": grouped.column("layer"), "component": grouped.column("component"),
        "unit": grouped.column("unit"), "position": grouped.column("position"), "token": token,
        "metric_clean": floats(clean), "metric_corrupt": floats(corrupt), "metric_patched": floats(patched),
        "recovered": floats(recovered(clean, corrupt, patched, query.source)),
    }, schema=PATCHING_SCHEMA)
    return out.sort_by([("layer", "ascending"), ("component", "ascending"), ("unit", "ascending"),
                        ("position", "ascending")])

