"""Reductions on the device: blocks of node values -> rows, with memory bounded by the result.

A `Block` holds one node kind at one layer for one batch: scalar values in the layout
(batch, token, key, unit) and a mask of the nodes that pass the query's conditions. Sinks take
blocks as batches stream through:

- `TopKSink`: a running top-k (or bottom-k) per group (layer, token, prompt, component), so
  memory is k rows per group whatever the number of prompts;
- `SelectSink`: every masked node (dense rows, moved to the host batch by batch);
- `OverPromptsSink`: running sums / counts / maxima per node across prompts (mean, sum, max),
  emitted at the end as one block for a top-k or select sink.

Rows are dicts of 1-D tensors (`Rows`). Ties are broken by a canonical node order (prompt,
component, layer, position, attended, unit), so results do not depend on the batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..query.catalog import COMPONENT_NAMES, COMPONENTS

KIND_CODE = {name: i for i, name in enumerate(COMPONENT_NAMES)}  # components in residual-stream order

NULL = -(2**40)  # integer NULL sentinel in row tensors
POS_OFFSET = 2**14  # positions (possibly negative: from the end) are shifted into [0, 2**15)

Rows = dict[str, torch.Tensor]


@dataclass
class BatchMeta:
    """Per-batch node coordinates. Positions may be absolute or from the end (negative)."""

    ordinal: torch.Tensor  # (batch,) index of the prompt in the prompt set
    prompt_id: torch.Tensor  # (batch,)
    position: torch.Tensor  # (batch, token)
    token_id: torch.Tensor  # (batch, token)


@dataclass
class Block:
    kind: str
    layer: int | None
    values: dict[str, torch.Tensor]  # scalar -> (batch, token, key, unit); NaN where undefined
    mask: torch.Tensor  # (batch, token, key, unit) bool
    meta: BatchMeta
    key_position: torch.Tensor | None = None  # (batch, key) for attn, else None
    key_token_id: torch.Tensor | None = None


def block_rows(block: Block, keep: torch.Tensor) -> Rows:
    """The rows of the nodes where `keep` is True, in (batch, token, key, unit) order."""
    b, t, k, u = keep.nonzero(as_tuple=True)
    n = b.numel()
    device = keep.device

    def const(value: int | None) -> torch.Tensor:
        return torch.full((n,), NULL if value is None else value, dtype=torch.long, device=device)

    meta = block.meta
    rows: Rows = {
        "ordinal": meta.ordinal[b],
        "prompt_id": meta.prompt_id[b],
        "kind": const(KIND_CODE[block.kind]),
        "layer": const(block.layer),
        "unit": const(None) if COMPONENTS[block.kind].unit is None else u,
        "position": meta.position[b, t],
        "attended": const(None) if block.key_position is None else block.key_position[b, k],
        "token_id": meta.token_id[b, t],
        "attended_token_id": const(None) if block.key_token_id is None else block.key_token_id[b, k],
    }
    for name, value in block.values.items():
        rows[name] = value[b, t, k, u]
    return rows


def concat_rows(parts: list[Rows]) -> Rows:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def take(rows: Rows, index: torch.Tensor) -> Rows:
    return {key: value[index] for key, value in rows.items()}


def _shifted(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == NULL, 0, x + POS_OFFSET + 1)


def tie_keys(rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical node order as two int64 keys (major, minor)."""
    major = rows["ordinal"] * 16 + rows["kind"]
    layer = torch.where(rows["layer"] == NULL, 0, rows["layer"] + 1)
    unit = torch.where(rows["unit"] == NULL, 0, rows["unit"] + 1)
    minor = ((layer * 2**16 + _shifted(rows["position"])) * 2**16 + _shifted(rows["attended"])) * 2**22 + unit
    return major, minor


def group_ids(rows: Rows, by: tuple[str, ...]) -> torch.Tensor:
    """One int64 per row naming its group (0 for all rows when `by` is empty); groups sort in
    the order of the `by` keys (components in residual-stream order: embed, attn, head, mlp, ...)."""
    gid = torch.zeros_like(rows["ordinal"])
    for key in by:
        if key == "component":
            gid = gid * 16 + rows["kind"]
        elif key == "layer":
            gid = gid * 512 + torch.where(rows["layer"] == NULL, 0, rows["layer"] + 1)
        elif key == "token":
            gid = gid * 2**16 + _shifted(rows["position"])
        elif key == "prompt":
            gid = gid * 2**26 + rows["ordinal"]
    return gid


def lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Indices that sort by keys[0], then keys[1], ... (all ascending, stable)."""
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def canonical_order(rows: Rows) -> Rows:
    major, minor = tie_keys(rows)
    return take(rows, lexsort([major, minor]))


class TopKSink:
    """Running top-k (bottom-k) of `rank_by` per group, across batches.

    Each block contributes its prefiltered candidates; they are merged and ranked (one sort of
    everything pending) when `PRUNE_AT` rows are pending and at the end, not once per block: a
    query's blocks then cost one sort instead of one each (a dozen on a small model)."""

    PRUNE_AT = 16_384  # pending candidate rows (about 100 bytes each) before a merge

    def __init__(self, k: int, rank_by: str, *, bottom: bool, by: tuple[str, ...]) -> None:
        self.k, self.rank_by, self.bottom, self.by = k, rank_by, bottom, by
        self.state: Rows | None = None
        self._pending: list[Rows] = []
        self._n_pending = 0

    def _score(self, values: torch.Tensor) -> torch.Tensor:
        score = -values if self.bottom else values
        return torch.nan_to_num(score, nan=float("-inf"))

    def add(self, block: Block) -> None:
        values = block.values[self.rank_by]
        candidate = block.mask & ~torch.isnan(values)
        # NaN and masked-out nodes score -inf (a real -inf value scores the lowest finite float, as in _score)
        score = torch.where(candidate, torch.nan_to_num(-values if self.bottom else values), float("-inf"))
        keep = candidate & (score >= self._threshold(score))
        rows = block_rows(block, keep)
        self._pending.append(rows)
        self._n_pending += rows["ordinal"].numel()
        if self._n_pending >= self.PRUNE_AT:
            self._merge()

    def _merge(self) -> None:
        parts = [{key: value for key, value in self.state.items() if key != "rank"}] if self.state else []
        parts += [rows for rows in self._pending if rows["ordinal"].numel()]
        self._pending, self._n_pending = [], 0
        if parts:
            self.state = concat_rows(parts)
            self._prune()

    def _threshold(self, score: torch.Tensor) -> torch.Tensor:
        """The k-th best score per in-block group, broadcast to the block (a cheap prefilter)."""
        B, T, K, U = score.shape
        if "prompt" in self.by and "token" in self.by:
            view = score.reshape(B * T, K * U)
        elif "prompt" in self.by:
            view = score.reshape(B, T * K * U)
        elif "token" in self.by:
            view = score.transpose(0, 1).reshape(T, B * K * U)
        else:
            view = score.reshape(1, -1)
        kth = view.topk(min(self.k, view.shape[1]), dim=1).values[:, -1]
        if "prompt" in self.by and "token" in self.by:
            return kth.view(B, T, 1, 1)
        if "prompt" in self.by:
            return kth.view(B, 1, 1, 1)
        if "token" in self.by:
            return kth.view(1, T, 1, 1)
        return kth.view(1, 1, 1, 1)

    def _prune(self) -> None:
        rows = self.state
        major, minor = tie_keys(rows)
        group = group_ids(rows, self.by)
        order = lexsort([group, -self._score(rows[self.rank_by]), major, minor])
        rows = take(rows, order)
        group = group[order]
        rank = _rank_in_group(group)
        keep = rank < self.k
        self.state = take(rows, keep.nonzero(as_tuple=True)[0])
        self.state["rank"] = rank[keep] + 1

    def result(self) -> Rows | None:
        self._merge()
        return self.state


def _rank_in_group(sorted_group: torch.Tensor) -> torch.Tensor:
    """0-based position of each row within its run of equal group ids."""
    n = sorted_group.numel()
    index = torch.arange(n, device=sorted_group.device)
    starts = torch.ones(n, dtype=torch.bool, device=sorted_group.device)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    start_index = torch.cummax(torch.where(starts, index, 0), dim=0).values
    return index - start_index


class SelectSink:
    """Dense rows of every masked node, moved to the host per block."""

    def __init__(self) -> None:
        self.parts: list[Rows] = []

    def add(self, block: Block) -> None:
        if block.mask.any():
            rows = block_rows(block, block.mask)
            self.parts.append({key: value.cpu() for key, value in rows.items()})

    def result(self) -> Rows | None:
        if not self.parts:
            return None
        return canonical_order(concat_rows(self.parts))


class OverPromptsSink:
    """Running reductions per node across prompts; `finish` emits one block per (kind, layer).

    Nodes are keyed by (position, attended, unit). Positions are absolute, or counted from the
    end of each prompt (`relative`, -1 = the last token) when the query's token conditions are
    all negative. A node missing from a prompt (a shorter prompt, a condition) is left out of
    that prompt's reduction; `mean` divides by the number of prompts that have it.
    """

    def __init__(self, reduction: str, relative: bool) -> None:
        self.reduction, self.relative = reduction, relative
        self.acc: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}
        self.tokens: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}

    def add(self, block: Block, lengths: torch.Tensor) -> None:
        B, T, K, U = block.mask.shape
        slot = self._slots(T, lengths)  # (batch, token)
        key_slot = self._slots(K, lengths) if block.key_position is not None else torch.zeros_like(slot[:, :1])
        n_slots = int(slot.max()) + 1
        n_keys = int(key_slot.max()) + 1
        acc = self._grow(self.acc, block, n_slots, n_keys, U)
        flat = (slot[:, :, None] * acc["n_keys"] + key_slot[:, None, :]).expand(B, T, K).reshape(-1)
        mask = block.mask.reshape(B * T * K, U)
        acc["count"].view(-1, U).index_add_(0, flat, mask.to(acc["count"].dtype))
        for name, value in block.values.items():
            v = value.reshape(B * T * K, U).to(acc[name].dtype)
            target = acc[name].view(-1, U)
            if self.reduction == "max":
                masked = v.masked_fill(~mask, float("-inf"))
                target.scatter_reduce_(0, flat[:, None].expand(-1, U), masked, "amax")
            else:
                target.index_add_(0, flat, torch.where(mask, v, 0))
        self._track_tokens(block, slot, key_slot)

    def _slots(self, T: int, lengths: torch.Tensor) -> torch.Tensor:
        t = torch.arange(T, device=lengths.device)[None, :]
        slot = (lengths[:, None] - 1 - t) if self.relative else t.expand(lengths.numel(), T)
        return slot.clamp(min=0)

    def _grow(self, store, block: Block, n_slots: int, n_keys: int, U: int) -> dict[str, torch.Tensor]:
        key = (block.kind, block.layer)
        device = block.mask.device
        old = store.get(key)
        P = max(n_slots, old["n_slots"] if old else 0)
        Kp = max(n_keys, old["n_keys"] if old else 0)
        if old is not None and old["n_slots"] == P and old["n_keys"] == Kp:
            return old
        fill = float("-inf") if self.reduction == "max" else 0.0
        new = {"n_slots": P, "n_keys": Kp}
        for name in ("count", *block.values):
            init = 0.0 if name == "count" else fill
            new[name] = torch.full((P, Kp, U), init, dtype=torch.float64, device=device)
            if old is not None:
                new[name][: old["n_slots"], : old["n_keys"]] = old[name]
        store[key] = new
        return new

    def _track_tokens(self, block: Block, slot: torch.Tensor, key_slot: torch.Tensor) -> None:
        """Token id per slot when every prompt agrees, else NULL (min == max over prompts)."""
        acc = self.acc[(block.kind, block.layer)]
        tok = self.tokens.setdefault((block.kind, block.layer), {})
        real = block.mask.any(dim=(2, 3))  # (batch, token)
        self._minmax(tok, "q", acc["n_slots"], slot[real], block.meta.token_id[real])
        if block.key_position is not None:
            real_keys = block.mask.any(dim=(1, 3))  # (batch, key)
            self._minmax(tok, "k", acc["n_keys"], key_slot[real_keys], block.key_token_id[real_keys])

    @staticmethod
    def _minmax(tok: dict, name: str, size: int, index: torch.Tensor, ids: torch.Tensor) -> None:
        for kind, init, op in (("min", 2**62, "amin"), ("max", -(2**62), "amax")):
            key = f"{name}_{kind}"
            old = tok.get(key)
            new = torch.full((size,), init, dtype=torch.long, device=ids.device)
            if old is not None:
                new[: old.numel()] = old
            new.scatter_reduce_(0, index, ids, op)
            tok[key] = new

    def finish(self) -> list[Block]:
        blocks = []
        for (kind, layer), acc in self.acc.items():
            blocks.append(self._emit(kind, layer, acc, self.tokens[(kind, layer)]))
        return blocks

    def _emit(self, kind: str, layer: int | None, acc: dict, tok: dict) -> Block:
        count = acc["count"]
        values = {}
        for name, total in acc.items():
            if name in ("count", "n_slots", "n_keys"):
                continue
            value = total / count.clamp(min=1) if self.reduction == "mean" else total
            values[name] = value.float()[None]
        P, Kp = acc["n_slots"], acc["n_keys"]
        device = count.device
        positions = self._positions(P, device)
        meta = BatchMeta(
            ordinal=torch.zeros(1, dtype=torch.long, device=device),
            prompt_id=torch.full((1,), NULL, dtype=torch.long, device=device),
            position=positions[None],
            token_id=_agreed(tok, "q", P)[None],
        )
        block = Block(kind, layer, values, (count > 0)[None], meta)
        if "k_min" in tok:
            block.key_position = self._positions(Kp, device)[None]
            block.key_token_id = _agreed(tok, "k", Kp)[None]
        return block

    def _positions(self, n: int, device) -> torch.Tensor:
        slots = torch.arange(n, device=device)
        return -(slots + 1) if self.relative else slots


def _agreed(tok: dict, name: str, size: int) -> torch.Tensor:
    lo, hi = tok[f"{name}_min"], tok[f"{name}_max"]
    out = torch.where(lo == hi, lo, NULL)
    full = torch.full((size,), NULL, dtype=torch.long, device=lo.device)
    full[: out.numel()] = out
    return full
