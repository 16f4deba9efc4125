"""The loss a node query differentiates, per prompt, from the logits at its last real token.

`logit_diff` = mean of the target logits − mean of the distractor logits (just the target mean
without distractors; lists averaged as TDB does); `logprob` = mean of the targets'
log-probabilities. A prompt's own `target` / `distractor` (from a prompts file) replace the
loss's lists; they are data, so a multi-token one is reported when the query runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..query.context import PromptRow
from ..query.errors import LOSS_HINT, TdbqlError
from ..query.plan import Loss


def loss_tokens(encode, loss: Loss | None, row: PromptRow) -> tuple[str, list[int], list[int]]:
    """(kind, target ids, distractor ids) for one prompt; the row's own strings win."""
    kind = loss.kind if loss is not None else "logit_diff"
    targets = [row.target] if row.target else list(loss.targets if loss else ())
    if row.target:
        distractors = [row.distractor] if row.distractor else []
    else:
        distractors = [row.distractor] if row.distractor else list(loss.distractors if loss else ())
    if not targets:
        raise TdbqlError(f"prompt {row.prompt_id} has no target: {LOSS_HINT}")
    return kind, [_single_token(encode, s) for s in targets], [_single_token(encode, s) for s in distractors]


def _single_token(encode, text: str) -> int:
    ids = encode(text)
    if len(ids) != 1:
        raise TdbqlError(f"target {text!r} is {len(ids)} tokens; targets must be single tokens")
    return ids[0]


def prompt_losses(encode, loss: Loss | None, rows: Sequence[PromptRow], last_logits: torch.Tensor) -> torch.Tensor:
    """Per-prompt loss from the logits at each prompt's last real token (batch, vocab): (batch,)."""
    out = []
    for b, row in enumerate(rows):
        kind, targets, distractors = loss_tokens(encode, loss, row)
        last = last_logits[b].float()
        if kind == "logprob":
            out.append(torch.log_softmax(last, -1)[targets].mean())
            continue
        value = last[targets].mean()
        if distractors:
            value = value - last[distractors].mean()
        out.append(value)
    return torch.stack(out)
