"""Steering: add a scaled direction to a residual-width activation during a forward pass.

    specs = steer_specs(loaded, query.steers, prompts, batch_size)   # directions resolved once
    add_steers(hooks, specs, batch)                                  # per batch

A direction is a sum of terms in the residual basis (d_model): `latent(mlp_L1, i)` the latent's
decoder row (through W_out for an MLP autoencoder), `unembed(" Paris")` the token's column of the
unembedding, `mean(clean)` / `mean(corrupt)` the mean activation at the steered site over that
side of the session's prompts (at the steer's position when it names one, over every real token
otherwise; one forward over those prompts, no autograd). The scale multiplies the whole sum.
Positions as everywhere: `@t` one token (negative from each prompt's end), none: every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..query.context import PromptRow
from ..query.plan import Direction, Steer
from .pairs import side
from .runtime.batching import Batch, batches, resolve_tokens
from .runtime.hooks import HookSet

WRITE_LOCATIONS = {"resid": "resid.post", "resid.pre": "resid.pre", "resid.mid": "resid.mid", "mlp": "mlp.out",
                   "attn": "attn.out"}


@dataclass(frozen=True)
class SteerSpec:
    """Add `vector` (d_model) at hook `location` of `layer`, at `token` (None: every token)."""

    location: str
    layer: int
    token: int | None
    vector: torch.Tensor

    def __str__(self) -> str:
        at = "every token" if self.token is None else f"token {self.token}"
        return f"{self.location}[{self.layer}] += a vector of norm {float(self.vector.norm()):.3g} at {at}"


def steer_specs(loaded, steers: Sequence[Steer], prompts: Sequence[PromptRow], batch_size: int) -> tuple:
    out = []
    for steer in steers:
        node = steer.node
        location = WRITE_LOCATIONS[node.component]
        vector = sum(d.sign * direction_vector(loaded, d, location, node.layer, node.token, prompts, batch_size)
                     for d in steer.terms)
        out.append(SteerSpec(location, node.layer, node.token, (steer.scale * vector).detach()))
    return tuple(out)


def direction_vector(loaded, d: Direction, location: str, layer: int, token: int | None,
                     prompts: Sequence[PromptRow], batch_size: int) -> torch.Tensor:
    if d.kind == "latent":
        return loaded.decoder_in_resid(d.site, d.layer)[d.index].float()
    if d.kind == "unembed":
        return loaded.model.W_U[:, loaded.encode(d.token)[0]].float()
    return mean_activation(loaded, side(prompts, d.side), location, layer, token, batch_size)


def mean_activation(loaded, rows: Sequence[PromptRow], location: str, layer: int, token: int | None,
                    batch_size: int) -> torch.Tensor:
    """The mean of the activation at (location, layer) over `rows`: at `token` of each prompt, or
    over every real token."""
    total, count = None, 0
    for batch in batches(loaded, rows, max_prompts=batch_size):
        kept = {}
        hooks = HookSet()
        hooks.add(location, layer, lambda x: kept.__setitem__("x", x.detach().float()))
        with torch.no_grad():
            loaded.model(batch.input_ids, batch.attention_mask, hooks, logit_positions=batch.lengths - 1)
        x = kept["x"]
        if token is None:
            values = x[batch.attention_mask]  # (real tokens, d_model)
        else:
            values = x[torch.arange(len(batch), device=x.device), resolve_tokens(token, batch)]
        total = values.sum(0) if total is None else total + values.sum(0)
        count += values.shape[0]
    return total / count


def add_steers(hooks: HookSet, specs: Sequence[SteerSpec], batch: Batch, *, every_token_only: bool = False) -> None:
    """One adding hook per steer; `every_token_only` keeps the steers without a position (the
    decoding steps of `generate`, where a prompt position does not exist)."""
    for spec in specs:
        if spec.token is None or not every_token_only:
            hooks.add(spec.location, spec.layer, _steer_hook(spec, batch))


def _steer_hook(spec: SteerSpec, batch: Batch):
    def hook(x: torch.Tensor) -> torch.Tensor:
        vector = spec.vector.to(device=x.device, dtype=x.dtype)
        if spec.token is None:
            return x + vector
        x = x.clone()
        b = torch.arange(x.shape[0], device=x.device)
        x[b, resolve_tokens(spec.token, batch)] += vector
        return x

    return hook
