"""The compiled fast path (`set compile = on`): a node query's passes through `torch.compile`.

Autograd cannot differentiate with respect to a tensor that a compiled graph computed inside
itself, so gradients at hooked activations come from zero *probes*: each location the query
differentiates at returns `x + probe`, where `probe` is a zero input that requires grad, so
∂L/∂probe = ∂L/∂x and the compiled graph only sees inputs and outputs. Weights are frozen, so
the backward computes input gradients only, as on the eager path.

One compiled function per capture signature (which locations are read, which are
differentiated, whether ln_f's scale is frozen); torch.compile keeps one graph per input shape
(`dynamic=False`), so repeating a query on the same prompts, or another query that reads the same
locations, reuses the graph. The first call at a new shape compiles (seconds).

Only plain plans take this path: no ablation, no patch, no traced node, no forward-mode (JVP)
pass, no contribution capture. Everything else runs eagerly; `explain` says which path a query takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..query.errors import TdbqlError
from .physical import NodePlan
from .runtime.batching import Batch
from .runtime.hooks import HookSet, location_shape
from .runtime.model import upcast
from .scalars import CONTRIBUTION_LOCATIONS, Raw

Location = tuple[str, "int | None"]


@dataclass(frozen=True)
class Signature:
    """What a compiled forward captures: values at `read`, gradients at `differentiated`."""

    read: tuple[Location, ...]
    differentiated: tuple[Location, ...]
    freeze_ln_f: bool


def signature(plan: NodePlan) -> Signature:
    def locations(passes: set[str]) -> tuple[Location, ...]:
        return tuple(sorted({(r.location, r.layer) for r in plan.raws if r.pass_ in passes}, key=_location_key))

    return Signature(locations({"fwd", "bwd"}), locations({"bwd"}), plan.freeze_ln_f and plan.needs_backward)


def refusal(plan: NodePlan) -> str | None:
    """Why `plan` cannot run compiled (None: it can)."""
    if plan.ablations:
        return "ablation"
    if plan.trace is not None:
        return "trace"
    if plan.needs_jvp:
        return "forward-mode pass"
    if any(r.location in CONTRIBUTION_LOCATIONS for r in plan.raws):
        return "contribution capture"
    if plan.patch:
        return "patch"
    return None


class CompiledPasses:
    """Compiled forward functions per signature, and the probe trick around them."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded
        self._compiled: dict[Signature, Callable] = {}

    def takes(self, plan: NodePlan) -> bool:
        return refusal(plan) is None

    def run(self, plan: NodePlan, batch: Batch, objective: Callable, store) -> None:
        """One forward (and backward) of `batch`; fills `store` (the engine's RawStore) as the eager
        path does. `objective(last_logits, store)` is what the backward differentiates."""
        sig = signature(plan)
        forward = self._compiled.get(sig)
        if forward is None:
            forward = self._compiled[sig] = torch.compile(self._forward_fn(sig), dynamic=False)
        padded = not bool(batch.attention_mask.all())
        with torch.set_grad_enabled(plan.needs_backward):
            probes = [self._probe(loc, batch) for loc in sig.differentiated] if plan.needs_backward else []
            try:
                logits, values = forward(batch.input_ids, batch.attention_mask if padded else None, padded, probes,
                                         batch.lengths - 1)
            except Exception as error:
                if isinstance(error, TdbqlError):
                    raise
                first_line = (str(error).splitlines() or [""])[0]
                raise TdbqlError(f"torch.compile failed ({type(error).__name__}: {first_line}); "
                                 "`set compile = off` runs queries eagerly") from error
            captured = dict(zip(sig.read, values))
            for (location, layer), value in captured.items():
                store.fwd[Raw(location, layer)] = value
            if plan.needs_backward:
                grads = torch.autograd.grad(objective(logits[:, 0], store), probes, allow_unused=True)
                for (location, layer), probe, grad in zip(sig.differentiated, probes, grads):
                    store.grads[Raw(location, layer, "bwd")] = torch.zeros_like(probe) if grad is None else grad

    def _probe(self, location: Location, batch: Batch) -> torch.Tensor:
        B, T = batch.input_ids.shape
        shape = location_shape(*location, self.loaded.config, self.loaded.saes, n_tokens=T, n_prompts=B)
        p = next(self.loaded.model.parameters())
        dtype = p.dtype
        if location[0].endswith(".scale"):  # layer norms keep their scale in float32 for half models
            dtype = upcast(torch.empty(0, dtype=dtype)).dtype
        return torch.zeros(shape, device=p.device, dtype=dtype, requires_grad=True)

    def _forward_fn(self, sig: Signature):
        model = self.loaded.model

        def forward(input_ids, attention_mask, padded: bool, probes: list[torch.Tensor], logit_positions):
            values: dict[Location, torch.Tensor] = {}
            probe_of = dict(zip(sig.differentiated, probes))
            hooks = HookSet()
            if sig.freeze_ln_f:
                hooks.add("ln_f.scale", None, torch.Tensor.detach)
            for location in sig.read:
                hooks.add(*location, _capture(values, location, probe_of.get(location)))
            logits = model(input_ids, attention_mask, hooks, padded=padded, logit_positions=logit_positions)
            return logits, [values[location] for location in sig.read]

        return forward


def _capture(values: dict, location: Location, probe: torch.Tensor | None):
    def hook(x: torch.Tensor) -> torch.Tensor:
        if probe is not None:
            x = x + probe
        values[location] = x
        return x

    return hook


def _location_key(location: Location) -> tuple[int, str]:
    name, layer = location
    return (-1 if layer is None else layer, name)
