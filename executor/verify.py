"""`verify`: the real intervention behind each ranked row, beside the estimate (AtP*'s check).

For each row of a ranked node query, the node alone is intervened on at its position and the
target re-measured, in batches of copies of the row's prompt:

- attrib_patch ranks patches: the row's activation taken from the clean prompt into the corrupt
  run (equal lengths, as attrib_patch needs); actual_effect = metric(patched corrupt run) −
  metric(corrupt run), which attrib_patch estimates as (act_clean − act_corrupt)·grad_corrupt;
- every other scalar ranks by an ablation estimate: the node set to zero in the clean run;
  actual_effect = metric(clean run) − metric(node zeroed), which act×grad estimates to first
  order (a·∂L/∂a ≈ L(a) − L(0)).

What "the node" is per component: a neuron's post-activation, one attention probability (attn),
a head's probabilities at its query token for every key (head), a latent, the embedding at a
token (embed), an autoencoder's error at a token. The query's ablations stay on in every run.
The Spearman rank correlation between the ranking scalar and actual_effect goes into the table's
metadata (the session prints it under the table).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from ..query.catalog import COMPONENTS
from ..query.context import NOTE_KEY, PromptRow
from ..query.errors import TdbqlError
from .interventions import Edits, Interventions, capture, write
from .pairs import side
from .patching import metric_of, padded, variant_metrics
from .physical import NodePlan
from .runtime.hooks import HookSet


def node_location(component: str, layer: int | None) -> tuple[str, int | None]:
    """The hook location a ranked row's node lives at."""
    if component == "mlp":
        return "mlp.post", layer
    if component in ("attn", "head"):
        return "attn.probs", layer
    if component == "embed":
        return "resid.embed", None
    site = COMPONENTS[component].site
    return (f"sae.{site}.latent" if COMPONENTS[component].unit == "latent" else f"sae.{site}.error"), layer


def add_actual_effect(loaded, table: pa.Table, plan: NodePlan, prompts: Sequence[PromptRow],
                      edits: Interventions, batch_size: int) -> pa.Table:
    """`table` with an actual_effect column and the rank correlation in its metadata."""
    patching = plan.scalars[0] == "attrib_patch"
    if patching and not all(p.corrupt is not None for p in prompts):
        raise TdbqlError("verify of attrib_patch patches from each clean prompt into its corrupt one: give the "
                         "pairs with `prompt \"...\" corrupt \"...\"`")
    by_prompt: dict[int, list[int]] = defaultdict(list)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        by_prompt[row["prompt_id"]].append(i)
    prompt_of = {p.prompt_id: p for p in prompts}
    effect = np.full(len(rows), np.nan)
    for prompt_id, indices in by_prompt.items():
        values = _prompt_effects(loaded, [rows[i] for i in indices], prompt_of[prompt_id], plan, edits,
                                 batch_size, patching)
        effect[indices] = values
    out = table.append_column(pa.field("actual_effect", pa.float64()), pa.array(effect, pa.float64()))
    rho = spearman(np.asarray([r[plan.scalars[0]] for r in rows], dtype=np.float64), effect)
    message = (f"verify: Spearman rank correlation {rho:.3f} between {plan.scalars[0]} and actual_effect "
               f"over {len(rows)} rows")
    return out.replace_schema_metadata({NOTE_KEY: message.encode()})


def _prompt_effects(loaded, rows: list[dict], prompt: PromptRow, plan: NodePlan, edits: Interventions,
                    batch_size: int, patching: bool) -> np.ndarray:
    loss = plan.loss
    run_row = side([prompt], "corrupt")[0] if patching else prompt
    run = padded(loaded, [run_row])
    locations = {node_location(r["component"], r["layer"]) for r in rows}
    source = capture(loaded, padded(loaded, [prompt]), locations) if patching else None
    hooks = HookSet()
    edits.add(hooks, run)
    baseline = float(metric_of(loaded, loss, run, hooks)[0])

    def add_edits(hooks: HookSet, chunk: Sequence) -> None:
        for (location, layer, _), e in _row_edits(chunk, run.input_ids.device).items():
            hooks.add(location, layer, _edit_hook(location, e, None if source is None else source[(location, layer)]))

    metrics = np.concatenate([m.numpy() for m in variant_metrics(loaded, loss, run_row, rows, batch_size, edits,
                                                                  add_edits)])
    return metrics - baseline if patching else baseline - metrics


def _row_edits(chunk: list[dict], device) -> dict[tuple[str, int | None, bool], Edits]:
    """Copy r of the batch intervenes on chunk[r]'s node (source row 0, same positions); grouped
    by location, layer and whether one key is named (an attn row) or every key (a head row)."""
    grouped: dict[tuple[str, int | None, bool], list] = defaultdict(list)
    for r, row in enumerate(chunk):
        location, layer = node_location(row["component"], row["layer"])
        grouped[(location, layer, row["attended"] is None)].append((r, row["position"], row["unit"], row["attended"]))
    out = {}
    for key, items in grouped.items():
        rows, positions, units, keys = zip(*items)
        tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        unit = None if units[0] is None else tensor(units)
        key_index = None if keys[0] is None else tensor(keys)
        out[key] = Edits(tensor(rows), tensor(positions), torch.zeros(len(rows), dtype=torch.long, device=device),
                         tensor(positions), unit, key_index, key_index)
    return out


def _edit_hook(location: str, e: Edits, source: torch.Tensor | None):
    def hook(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        write(x, location, e, None if source is None else source.to(x.dtype))
        return x

    return hook


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than two finite pairs."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks
