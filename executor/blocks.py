"""Blocks: a batch's node values per (component, layer), masked by the query's conditions.

`node_blocks` runs a node plan's passes over one batch, then derives one block at a time (so
only one block's values exist at once) for the sinks of reduce.py. Masks stay broadcast views
until a condition needs a full tensor. Rows that do not exist are masked out: padding, keys
after the query token, and the corrupted prompt of an (clean, corrupted) pair.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..query.plan import LogitsQuery
from .conditions import and_mask, field_mask, scalar_mask
from .interventions import Interventions
from .passes import run_passes
from .physical import NodePlan, SitePlan
from .reduce import BatchMeta, Block
from .runtime.batching import Batch
from .scalars import Context, Weights


def node_blocks(loaded, plan: NodePlan, batch: Batch, edits: Interventions, weights: Weights, *,
                compiled=None) -> Iterator[Block]:
    """One batch through the passes of `plan` under `edits`, then a block of node values per
    (component, layer). `weights` caches weight-derived tensors across batches and queries."""
    store = run_passes(loaded, plan, batch, edits, compiled=compiled)
    meta = BatchMeta(
        ordinal=batch.ordinals,
        prompt_id=batch.prompt_ids,
        position=torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device).expand_as(batch.input_ids),
        token_id=batch.input_ids,
    )
    for site_plan in plan.sites:
        with torch.no_grad():
            ctx = Context(site_plan.site, store.get, weights)
            values = {name: None if d is None else d.compute(ctx).float() for name, d in site_plan.derivers}
            yield _block(plan, site_plan, values, batch, meta)


def _block(plan: NodePlan, site_plan: SitePlan, values: dict, batch: Batch, meta: BatchMeta) -> Block:
    site = site_plan.site
    device = batch.input_ids.device
    shape = next(v.shape for v in values.values() if v is not None)
    values = {k: (v if v is not None else torch.full(shape, float("nan"), device=device)) for k, v in values.items()}
    everything = torch.ones((), dtype=torch.bool, device=device).expand(shape)  # a view
    block = Block(site.kind, site.layer, values, everything, meta)
    if site.kind == "attn":
        block.key_position = meta.position
        block.key_token_id = meta.token_id
    where = plan.query.where
    mask = _valid(block, batch, plan.pairs)
    mask = and_mask(mask, field_mask(where, site.kind, tuple(shape), batch.lengths, meta.prompt_id,
                                     block.key_position is not None))
    if plan.query.over_prompts is None:  # over prompts: scalar conditions apply to the reduced values
        mask = and_mask(mask, scalar_mask(where, values, device))
    block.mask = mask
    return block


def _valid(block: Block, batch: Batch, pairs: bool) -> torch.Tensor:
    B, T, K, U = block.mask.shape
    t = torch.arange(T, device=block.mask.device)
    valid = (t[None, :] < batch.lengths[:, None])[:, :, None, None]  # (batch, token, 1, 1)
    if block.key_position is not None:
        valid = valid & (t[None, None, :, None] <= t[None, :, None, None])
    if pairs:
        valid = valid & (torch.arange(B, device=valid.device) % 2 == 0)[:, None, None, None]
    return valid.expand(B, T, K, U)


def logit_rows(query: LogitsQuery, batch: Batch, logits: torch.Tensor) -> dict | None:
    """The top-k vocabulary rows at every (prompt, position) the `where` keeps; None if none."""
    B, T, V = logits.shape
    device = logits.device
    keep = torch.arange(T, device=device)[None, :] < batch.lengths[:, None]  # (batch, token)
    mask = field_mask(query.where, "embed", (B, T, 1, 1), batch.lengths, batch.prompt_ids, False)
    if mask is not None:
        keep = keep & mask.expand(B, T, 1, 1)[:, :, 0, 0]
    b, t = keep.nonzero(as_tuple=True)
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
        "rank": torch.arange(1, k + 1, device=device).repeat(n),
    }
