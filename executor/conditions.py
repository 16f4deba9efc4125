"""The one evaluator of `where` conditions, for node blocks, logits and lenses.

A condition compares a field with a number, a range `lo..hi` (inclusive) or a list. Token and
attended positions may be negative: a negative bound counts from the end of each prompt, so it is
compared with the position minus the prompt's length (`rel`), a non-negative one with the
position itself. `layer` and `component` are decided per block before any tensor work
(`static_conditions_pass`); the rest become masks broadcastable to (batch, token, key, unit).
The binder has checked fields and values (query/bind.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..query.catalog import COMPONENTS, NODE_FIELDS
from ..query.plan import Condition, Range

_OPS = {"=": torch.eq, "!=": torch.ne, "<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "in": torch.eq}


def compare(x: torch.Tensor, op: str, value, *, rel: torch.Tensor | None = None) -> torch.Tensor:
    """`x op value` as a bool tensor; with `rel` (positions from the end), negative bounds
    compare against it."""

    def side(v):
        return rel if (rel is not None and v < 0) else x

    if isinstance(value, Range):
        return (side(value.lo) >= value.lo) & (side(value.hi) <= value.hi)
    if isinstance(value, tuple):
        out = torch.zeros_like(x, dtype=torch.bool)
        for v in value:
            out = out | (side(v) == v)
        return out
    return _OPS[op](side(value), value)


def compare_name(name: str, op: str, value) -> bool:
    """`component = mlp`, `component != attn`."""
    return (name == value) if op == "=" else (name != value)


def static_conditions_pass(where: Sequence[Condition], kind: str, layer: int | None) -> bool:
    """Whether a (component, layer) block can hold any row: its layer and component conditions."""
    for cond in where:
        if cond.field == "component" and not compare_name(kind, cond.op, cond.value):
            return False
        if cond.field == "layer":
            if layer is None or not bool(compare(torch.tensor(layer), cond.op, cond.value)):
                return False
    return True


def token_conditions_relative(where: Sequence[Condition]) -> bool:
    """Whether every token condition names positions from the end (over-prompts keys them so)."""
    values = [c.value for c in where if c.field == "token"]
    if not values:
        return False

    def negative(v) -> bool:
        if isinstance(v, Range):
            return v.lo < 0 and v.hi < 0
        if isinstance(v, tuple):
            return all(x < 0 for x in v)
        return isinstance(v, (int, float)) and v < 0

    return all(negative(v) for v in values)


def field_mask(where: Sequence[Condition], kind: str, shape: tuple[int, int, int, int], lengths: torch.Tensor,
               prompt_id: torch.Tensor, has_keys: bool) -> torch.Tensor | None:
    """Conditions on node fields (not scalars) for a block of `shape` (batch, token, key, unit),
    broadcastable to it; None when there are none."""
    if all(cond.field in ("layer", "component") or cond.field not in NODE_FIELDS for cond in where):
        return None
    B, T, K, U = shape
    device = lengths.device
    out = torch.ones((), dtype=torch.bool, device=device)
    t = torch.arange(T, device=device)[None, :, None, None]
    length = lengths[:, None, None, None]
    units = torch.arange(U, device=device)[None, None, None, :]
    unit = COMPONENTS[kind].unit
    for cond in where:
        f = cond.field
        if f == "token":
            out = out & compare(t, cond.op, cond.value, rel=t - length)
        elif f == "attended":
            if not has_keys:
                return torch.zeros_like(out)
            u = torch.arange(K, device=device)[None, None, :, None]
            out = out & compare(u, cond.op, cond.value, rel=u - length)
        elif f in ("head", "unit"):
            if (unit != "head") if f == "head" else (unit is None):
                return torch.zeros_like(out)
            out = out & compare(units, cond.op, cond.value)
        elif f == "prompt":
            out = out & compare(prompt_id[:, None, None, None], cond.op, cond.value)
    return out


def scalar_mask(where: Sequence[Condition], values: dict[str, torch.Tensor], device) -> torch.Tensor | None:
    """Conditions on scalars (NaN fails every condition); None when there are none."""
    if all(cond.field in NODE_FIELDS for cond in where):
        return None
    out = torch.ones((), dtype=torch.bool, device=device)
    for cond in where:
        if cond.field not in NODE_FIELDS:
            value = values[cond.field]
            out = out & compare(value, cond.op, cond.value) & ~torch.isnan(value)
    return out


def positions_kept(where: Sequence[Condition], field: str, n: int) -> torch.Tensor:
    """The positions 0..n-1 of a prompt of n tokens (or layer / prompt ids when `field` says so
    and n is their count) that pass every condition on `field`."""
    values = torch.arange(n)
    keep = torch.ones(n, dtype=torch.bool)
    for cond in where:
        if cond.field == field:
            keep &= compare(values, cond.op, cond.value, rel=values - n if field == "token" else None)
    return values[keep]


def ids_kept(where: Sequence[Condition], field: str, ids: torch.Tensor) -> torch.Tensor:
    """The ids (layers, prompt ids) that pass every condition on `field`."""
    keep = torch.ones(len(ids), dtype=torch.bool)
    for cond in where:
        if cond.field == field:
            keep &= compare(ids, cond.op, cond.value)
    return ids[keep]


def and_mask(mask: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    """`mask & other` (None: no condition), keeping `mask`'s shape."""
    if other is None:
        return mask
    return (mask & other).expand(mask.shape)
