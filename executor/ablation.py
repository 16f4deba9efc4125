"""Ablations: hooks that overwrite a neuron, latent or head pattern during a forward pass.

    hooks = HookSet()
    means = ablation_means(loaded, specs, prompts, batch_size) if needs_means(specs) else {}
    add_ablations(hooks, specs, batch, means)          # per batch, before the pass's own hooks

Neurons (mlp.post) and latents (sae.<site>.latent) are set at one token (resolved per prompt;
negative counts from the prompt's end) or at every token; a head's attention probabilities at
one query token for one key, all keys, or its whole pattern. `=mean` values come from a first
forward pass of the clean model over the whole prompt set (see `_MeanAccumulator`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..query.catalog import COMPONENTS
from ..query.context import PromptRow
from ..query.plan import Ablation
from .runtime.batching import AddHooks, Batch, batches, resolve_tokens
from .runtime.hooks import HookSet


@dataclass(frozen=True)
class AblationSpec:
    """One compiled `ablate` clause: set `index` at hook `location` of `layer` to `value`
    (a number, or "mean" for the prompt-set mean), at `token` (every token when None) and, for
    heads, at `key` (every key when None)."""

    location: str
    layer: int
    index: int
    token: int | None
    key: int | None
    value: float | str
    heads: bool  # attention probabilities (batch, head, token, key)


def ablation_spec(ablation: Ablation) -> AblationSpec:
    """The hook that carries out a bound `ablate` clause: a neuron's mlp.post, a head's attention
    probabilities, a latent of the autoencoder spliced in at its site."""
    node = ablation.node
    if node.component == "mlp":
        return AblationSpec("mlp.post", node.layer, node.index, node.token, None, ablation.value, False)
    if node.component == "attn":
        return AblationSpec("attn.probs", node.layer, node.index, node.token, node.key, ablation.value, True)
    site = COMPONENTS[node.component].site
    return AblationSpec(f"sae.{site}.latent", node.layer, node.index, node.token, None, ablation.value, False)


def ablation_hooks(ablations: Sequence[AblationSpec], means: dict) -> AddHooks:
    """`add_hooks(hooks, batch)` for passes that take other hooks first (lens, contributions)."""

    def add(hooks: HookSet, batch: Batch) -> None:
        add_ablations(hooks, ablations, batch, means)

    return add


def needs_means(ablations: Sequence[AblationSpec]) -> bool:
    """Whether any ablation is `=mean` (a first pass over the prompt set is needed)."""
    return any(a.value == "mean" for a in ablations)


def add_ablations(hooks: HookSet, ablations: Sequence[AblationSpec], batch: Batch, means: dict) -> None:
    """Register one overwriting hook per ablation for `batch`; `means` from `ablation_means`."""
    for i, spec in enumerate(ablations):
        value = means[i] if spec.value == "mean" else float(spec.value)
        hooks.add(spec.location, spec.layer, _ablation_hook(spec, value, batch))


def ablation_means(loaded, ablations: Sequence[AblationSpec], prompts: Sequence[PromptRow], batch_size: int) -> dict:
    """First pass over the prompt set: the mean of each `=mean` ablation target (clean model)."""
    wanted = {i: a for i, a in enumerate(ablations) if a.value == "mean"}
    acc = {i: _MeanAccumulator(a) for i, a in wanted.items()}
    for batch in batches(loaded, prompts, max_prompts=batch_size):
        hooks = HookSet()
        for i, spec in wanted.items():
            hooks.add(spec.location, spec.layer, acc[i].hook(batch))
        with torch.no_grad():
            loaded.model(batch.input_ids, batch.attention_mask, hooks)
    return {i: a.mean() for i, a in acc.items()}


def _ablation_hook(spec: AblationSpec, value, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if spec.heads:
            _ablate_head(x, spec, value, batch)
        else:
            _ablate_unit(x, spec, value, batch)
        return x

    return hook


def _ablate_unit(x: torch.Tensor, spec: AblationSpec, value, batch: Batch) -> None:
    """x: (batch, token, unit)."""
    if spec.token is None:
        x[:, :, spec.index] = value
        return
    b = torch.arange(x.shape[0], device=x.device)
    x[b, resolve_tokens(spec.token, batch), spec.index] = value


def _ablate_head(x: torch.Tensor, spec: AblationSpec, value, batch: Batch) -> None:
    """x: (batch, head, token, key); the head's probabilities at query t for all keys (or one key).
    A mean pattern is cut to each prompt's own keys (padding keys keep probability 0)."""
    B, H, T, U = x.shape
    real_keys = batch.attention_mask[:, :U].to(x.dtype)  # (batch, key)
    if spec.key is None and not isinstance(value, torch.Tensor):
        value = torch.full((U,), float(value), dtype=x.dtype, device=x.device)
    if isinstance(value, torch.Tensor):
        value = value.to(x.dtype)[..., :U]
    if spec.token is None:
        if isinstance(value, torch.Tensor):
            value = value[:T] * real_keys[:, None, :]  # (batch, token, key)
        x[:, spec.index] = value
        return
    b = torch.arange(B, device=x.device)
    t = resolve_tokens(spec.token, batch)
    if spec.key is not None:
        u = resolve_tokens(spec.key, batch)
        x[b, spec.index, t, u] = value[u] if isinstance(value, torch.Tensor) else value
    else:
        x[b, spec.index, t] = value * real_keys if isinstance(value, torch.Tensor) else value


class _MeanAccumulator:
    """Sums over the prompt set for one `=mean` ablation.

    Neuron / latent: the mean at the given token (resolved per prompt), or over every real token.
    Head: the mean probability row over keys at the given query token, keys at absolute positions
    padded with 0 to the longest prompt; with no token, the mean (query, key) pattern over prompts
    that have that query position.
    """

    def __init__(self, spec: AblationSpec) -> None:
        self.spec = spec
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def hook(self, batch: Batch) -> Callable[[torch.Tensor], None]:
        def capture(x: torch.Tensor) -> None:
            self._add(x.float(), batch)

        return capture

    def _add(self, x: torch.Tensor, batch: Batch) -> None:
        spec, B = self.spec, x.shape[0]
        real = batch.attention_mask
        b = torch.arange(B, device=x.device)
        if not spec.heads:
            if spec.token is None:
                total, count = x[:, :, spec.index][real].sum(), real.sum()
            else:
                total, count = x[b, resolve_tokens(spec.token, batch), spec.index].sum(), torch.tensor(B)
            self._accumulate(total.reshape(1), count.reshape(1).float())
            return
        if spec.token is None:
            rows = x[:, spec.index] * real[:, :, None]  # (batch, token, key)
            self._accumulate(rows.sum(0), real.float().sum(0)[:, None].expand_as(rows[0]).contiguous())
        else:
            t = resolve_tokens(spec.token, batch)
            rows = x[b, spec.index, t]  # (batch, key); keys past a prompt's end count as 0
            self._accumulate(rows.sum(0), torch.tensor([float(B)]))

    def _accumulate(self, total: torch.Tensor, count: torch.Tensor) -> None:
        count = count.to(total.device)
        if self.total is None:
            self.total, self.count = total, count
            return
        self.total, total = _pad_to_same(self.total, total)
        if count.numel() > 1:
            self.count, count = _pad_to_same(self.count, count)
        self.total = self.total + total
        self.count = self.count + count

    def mean(self):
        mean = self.total / self.count.clamp(min=1)
        return float(mean) if mean.numel() == 1 and not self.spec.heads else mean


def _pad_to_same(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = [max(x, y) for x, y in zip(a.shape, b.shape)]

    def pad(t):
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        out[tuple(slice(0, s) for s in t.shape)] = t
        return out

    return pad(a), pad(b)


__all__ = ["AblationSpec", "ablation_hooks", "ablation_means", "ablation_spec", "add_ablations", "needs_means"]
