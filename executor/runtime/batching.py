"""Prompt batching, the one way every pass over prompts gets its tensors.

    for batch in batches(loaded, prompts, max_prompts=8):       # the engine: a prompt count
    for batch in batches(loaded, prompts, token_budget=4096):   # contrib / lens / routes: padded tokens

Every prompt is tokenised and checked against the model's context (n_ctx) before the first
batch is built, so a bad prompt fails the query before any forward pass. A batch is
right-padded: real tokens first, `attention_mask` True on them, pad id 0 after them.
With `pairs=True` (attrib_patch's (clean, corrupted) pairs) the prompts must come in pairs of
equal token length and a batch never splits a pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ...query.checks import lone_surrogate
from ...query.errors import TdbqlError
from .hooks import HookSet


class PromptRow(Protocol):
    """What batching reads of a prompt (the shell's prompt rows have more)."""

    prompt_id: int
    text: str

DEFAULT_TOKEN_BUDGET = 4096  # padded tokens per batch for the passes that split by tokens


@dataclass
class Batch:
    """Right-padded prompts. Tensors live on the model's device; `rows` / `token_ids` are host-side."""

    rows: list[PromptRow]
    token_ids: list[list[int]]  # each prompt's tokens, unpadded
    ordinals: torch.Tensor  # (batch,) the prompt's index in the whole prompt set
    prompt_ids: torch.Tensor  # (batch,)
    input_ids: torch.Tensor  # (batch, token), right-padded with 0
    attention_mask: torch.Tensor  # (batch, token) bool, True on real tokens
    lengths: torch.Tensor  # (batch,) real tokens per prompt

    def __len__(self) -> int:
        return len(self.rows)

    def length(self, row: int) -> int:
        return len(self.token_ids[row])

    def prompt_id(self, row: int) -> int:
        return self.rows[row].prompt_id


# Registers other hooks (e.g. the engine's ablations) for one batch before a pass's own hooks,
# so that what the pass captures sees their effect: add_hooks(hooks, batch).
AddHooks = Callable[[HookSet, Batch], None]


def encode_prompts(loaded, prompts: Sequence[PromptRow], *, what: str = "prompt") -> list[list[int]]:
    """Token ids per prompt; a TdbqlError for an empty prompt, one longer than n_ctx, or one
    that is not text (a lone surrogate, e.g. from a JSON file's "\\udce9")."""
    n_ctx = loaded.config.n_ctx
    encoded = []
    for prompt in prompts:
        bad = lone_surrogate(prompt.text)
        if bad is not None:
            raise TdbqlError(f"{what} {prompt.prompt_id} holds an invalid character U+{ord(prompt.text[bad]):04X} "
                             f"at character {bad + 1}; prompts must be UTF-8 text")
        ids = loaded.encode(prompt.text)
        if not ids:
            raise TdbqlError(f"{what} {prompt.prompt_id} has no tokens")
        if len(ids) > n_ctx:
            raise TdbqlError(f"{what} {prompt.prompt_id} has {len(ids)} tokens; the model reads at most {n_ctx}")
        encoded.append(ids)
    return encoded


def check_pairs(prompts: Sequence[PromptRow], encoded: Sequence[list[int]]) -> None:
    """attrib_patch reads prompts as (clean, corrupted) pairs of equal token length."""
    if len(prompts) % 2:
        raise TdbqlError("attrib_patch reads the prompts as (clean, corrupted) pairs: give an even number")
    for i in range(0, len(prompts), 2):
        if len(encoded[i]) != len(encoded[i + 1]):
            raise TdbqlError(
                f"attrib_patch pairs prompts {prompts[i].prompt_id} and {prompts[i + 1].prompt_id}, "
                f"which have {len(encoded[i])} and {len(encoded[i + 1])} tokens; they must match"
            )


def batches(
    loaded,
    prompts: Sequence[PromptRow],
    *,
    max_prompts: int | None = None,
    token_budget: int | None = None,
    pairs: bool = False,
) -> Iterator[Batch]:
    """Right-padded batches, split by a prompt count (`max_prompts`) or by a budget of padded
    tokens (`token_budget`: batch size x longest prompt; a batch holds at least one prompt, or
    one pair). Exactly one of the two is given."""
    if (max_prompts is None) == (token_budget is None):
        raise ValueError("batches: give exactly one of max_prompts and token_budget")
    encoded = encode_prompts(loaded, prompts)
    if pairs:
        check_pairs(prompts, encoded)
    step = 2 if pairs else 1
    start = 0
    while start < len(prompts):
        stop = _batch_end(encoded, start, step, max_prompts, token_budget)
        yield pad(prompts[start:stop], encoded[start:stop], start, loaded.device)
        start = stop


def _batch_end(encoded: list[list[int]], start: int, step: int, max_prompts: int | None, token_budget: int | None) -> int:
    """End of the batch that starts at `start`: grow by `step` prompts while the limit holds."""
    stop = min(len(encoded), start + step)
    if max_prompts is not None:
        size = max_prompts + (max_prompts % step)  # whole pairs
        return min(len(encoded), start + max(size, step))
    width = max(len(ids) for ids in encoded[start:stop])
    while stop < len(encoded):
        grown = min(len(encoded), stop + step)
        width_grown = max(width, *(len(ids) for ids in encoded[stop:grown]))
        if width_grown * (grown - start) > token_budget:
            break
        stop, width = grown, width_grown
    return stop


def pad(rows: Sequence[PromptRow], encoded: Sequence[list[int]], first_ordinal: int, device: torch.device) -> Batch:
    """One right-padded batch of already-encoded prompts."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, ids in enumerate(encoded):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = True
    return Batch(
        rows=list(rows),
        token_ids=[list(ids) for ids in encoded],
        ordinals=torch.arange(first_ordinal, first_ordinal + len(rows), device=device),
        prompt_ids=torch.tensor([r.prompt_id for r in rows], dtype=torch.long, device=device),
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        lengths=torch.tensor([len(ids) for ids in encoded], dtype=torch.long, device=device),
    )


def resolve_tokens(token: int, batch: Batch) -> torch.Tensor:
    """Per-prompt absolute position of `token` (negative counts from each prompt's end)."""
    lengths = batch.lengths
    t = lengths + token if token < 0 else torch.full_like(lengths, token)
    bad = (t < 0) | (t >= lengths)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise TdbqlError(f"token {token} is outside prompt {batch.rows[i].prompt_id} ({int(lengths[i])} tokens)")
    return t


def batch_hooks(batch: Batch, add_hooks: AddHooks | None = None) -> HookSet:
    """A fresh HookSet holding what `add_hooks` registers for `batch` (e.g. the engine's ablations);
    capture hooks added afterwards run after them, so they see the edited values."""
    hooks = HookSet()
    if add_hooks is not None:
        add_hooks(hooks, batch)
    return hooks


def forward_no_grad(loaded, batch: Batch, hooks: HookSet) -> torch.Tensor:
    """One forward pass of `batch` without autograd; returns the logits."""
    with torch.no_grad():
        return loaded.model(batch.input_ids, attention_mask=batch.attention_mask, hooks=hooks)


__all__ = ["DEFAULT_TOKEN_BUDGET", "AddHooks", "Batch", "batch_hooks", "batches", "check_pairs", "encode_prompts",
           "forward_no_grad", "pad", "resolve_tokens"]
