"""Which keys a query token sees: the causal rule, written once.

A query token t attends to key tokens u <= t. Scalars summed over keys (a head's `act`), the
contribution of a head, the traced write of a head without a key and the route graph's
attention edges all sum or cut by this rule.
"""

from __future__ import annotations

import torch


def keys_up_to(t: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(len(t), n_keys) bool: True where key u <= t[i]."""
    return torch.arange(n_keys, device=t.device)[None, :] <= t[:, None]


def causal_mask(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, n) bool, [t, u] True where u <= t."""
    return keys_up_to(torch.arange(n, device=device), n)


def causal_sum(x: torch.Tensor) -> torch.Tensor:
    """(batch, token, key, unit) summed over the keys u <= t each token sees -> (batch, token, 1,
    unit). Masking first matters: gradients at hidden keys are not zero."""
    visible = causal_mask(x.shape[1], x.device)[None, :, :, None]
    return torch.where(visible, x, 0).sum(2, keepdim=True)
