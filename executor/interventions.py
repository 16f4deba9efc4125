"""Interventions on a forward pass: ablations, and patches from the other prompt of each pair.

    patcher = Patcher(loaded, patch_specs(query.patch), prompts)    # prompts with `corrupt` set
    rows = patcher.run_rows                                          # the prompts that run
    edits = Interventions(ablation_specs, means, patcher)
    edits.add(hooks, batch)                                          # per batch, before a pass's own hooks

A patch `from clean` runs each pair's corrupt prompt with the named activations taken from its
clean prompt (denoising); `from corrupt` runs the clean prompt with them from the corrupt one
(noising). For each batch of running prompts, one forward of their source prompts (no autograd)
captures the patched locations, then hooks write them into the run.

Steers (steering.py) are added last.

Positions align from the end of each prompt: position -1 is the last token of both. `@p` with
p >= 0 names position p of the prompt that runs; its source position is p - n_run + n_source.
A patch without `@` covers every position of the running prompt that has a counterpart (all of
them when the two have the same length; the first n_run - n_source stay unpatched when the
running prompt is the longer). A position one side lacks is an error naming the pair.

What a node patches: `attn[L,H]` the head's output z[t, H] (its slice of the attention output
projection's input, TransformerLens' hook_z), `attn[L,H]@t:u` the attention probability A[t, u],
`mlp[L,N]` the neuron's post-activation, `mlp[L]` / `attn[L]` the sublayer's whole write,
`resid.pre[L]` / `resid.mid[L]` / `resid[L]` the residual vector, a latent its activation (the
autoencoder's error keeps the running prompt's value). Ablations are applied first, so where both
name the same activation the patch wins; the source run has no ablations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..query.catalog import COMPONENTS
from ..query.context import PromptRow
from ..query.errors import TdbqlError
from ..query.plan import NodeRef, Patch
from .ablation import AblationSpec, add_ablations
from .pairs import other, side
from .runtime.batching import Batch, encode_prompts, pad
from .runtime.hooks import HookSet
from .steering import WRITE_LOCATIONS, SteerSpec, add_steers

RESIDUAL_LOCATIONS = {kind: WRITE_LOCATIONS[kind] for kind in ("resid", "resid.pre", "resid.mid")}


@dataclass(frozen=True)
class PatchSpec:
    """One patched activation: hook `location` of `layer`, `unit` (head, neuron or latent; None
    for a whole vector) at `token` (None: every aligned position) and, for an attention
    probability, `key`."""

    location: str
    layer: int
    unit: int | None = None
    token: int | None = None
    key: int | None = None

    def __str__(self) -> str:
        unit = "" if self.unit is None else f" unit {self.unit}"
        at = "every aligned position" if self.token is None else f"position {self.token}"
        key = "" if self.key is None else f" key {self.key}"
        return f"{self.location}[{self.layer}]{unit} at {at}{key}"


def patch_spec(node: NodeRef) -> PatchSpec:
    """Where a bound node reference's activation lives (see the module docstring)."""
    kind, layer = node.component, node.layer
    if kind in RESIDUAL_LOCATIONS:
        return PatchSpec(RESIDUAL_LOCATIONS[kind], layer, None, node.token)
    if kind == "mlp":
        return PatchSpec("mlp.post" if node.index is not None else "mlp.out", layer, node.index, node.token)
    if kind == "attn" and node.index is None:
        return PatchSpec("attn.out", layer, None, node.token)
    if kind == "attn":
        location = "attn.z" if node.key is None else "attn.probs"
        return PatchSpec(location, layer, node.index, node.token, node.key)
    return PatchSpec(f"sae.{COMPONENTS[kind].site}.latent", layer, node.index, node.token)


def patch_specs(patch: Patch | None) -> tuple[PatchSpec, ...]:
    return () if patch is None else tuple(patch_spec(node) for node in patch.nodes)


class Patcher:
    """A patch clause over a prompt set of pairs: the rows that run, and per batch the source
    activations and the hooks that write them in."""

    def __init__(self, loaded, specs: Sequence[PatchSpec], prompts: Sequence[PromptRow], source: str) -> None:
        self.loaded, self.specs, self.source = loaded, tuple(specs), source
        self.run_rows = side(prompts, other(source))
        self._sources = {p.prompt_id: p for p in side(prompts, source)}

    def add(self, hooks: HookSet, batch: Batch) -> None:
        rows = [self._sources[r.prompt_id] for r in batch.rows]
        source = pad(rows, encode_prompts(self.loaded, rows, what=f"{self.source} prompt"), 0, self.loaded.device)
        cached = capture(self.loaded, source, {(s.location, s.layer) for s in self.specs})
        by_location: dict[tuple[str, int], list[Edits]] = {}
        for spec in self.specs:
            edits = aligned_edits(spec, batch, source, self.source)
            by_location.setdefault((spec.location, spec.layer), []).append(edits)
        for (location, layer), edits in by_location.items():
            hooks.add(location, layer, edit_hook(location, edits, cached[(location, layer)]))


@dataclass(frozen=True)
class Edits:
    """Index tensors for one write: run rows/positions <- source rows/positions (same length);
    `unit` / `key` / `source_key` (None or like `rows`) select within the activation."""

    rows: torch.Tensor
    positions: torch.Tensor
    source_rows: torch.Tensor
    source_positions: torch.Tensor
    unit: torch.Tensor | None = None
    key: torch.Tensor | None = None
    source_key: torch.Tensor | None = None


def aligned_edits(spec: PatchSpec, run: Batch, source: Batch, source_name: str) -> Edits:
    """Row b of `run` takes row b of `source`, positions aligned from the end."""
    rows, positions, source_positions, keys, source_keys = [], [], [], [], []
    for b, (n_run, n_source) in enumerate(zip(run.lengths.tolist(), source.lengths.tolist())):
        prompt_id = run.rows[b].prompt_id
        shift = n_source - n_run
        if spec.token is None:
            ts = list(range(max(0, -shift), n_run))
        else:
            ts = [_position(spec.token, n_run, prompt_id, f"the prompt that runs ({n_run} tokens)")]
        for t in ts:
            s = t + shift
            if not 0 <= s < n_source:
                raise TdbqlError(f"patch position {spec.token} of pair {prompt_id} has no counterpart in its "
                                 f"{source_name} prompt ({n_source} tokens; positions align from the end)")
            rows.append(b)
            positions.append(t)
            source_positions.append(s)
            if spec.key is not None:
                u = _position(spec.key, n_run, prompt_id, f"the prompt that runs ({n_run} tokens)")
                if u > t or not 0 <= u + shift < n_source:
                    raise TdbqlError(f"patch key {spec.key} of pair {prompt_id} is after its query token or has no "
                                     f"counterpart in the {source_name} prompt")
                keys.append(u)
                source_keys.append(u + shift)
    device = run.input_ids.device

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    n = len(rows)
    unit = None if spec.unit is None else torch.full((n,), spec.unit, dtype=torch.long, device=device)
    return Edits(tensor(rows), tensor(positions), tensor(rows), tensor(source_positions), unit,
                 tensor(keys) if spec.key is not None else None, tensor(source_keys) if spec.key is not None else None)


def _position(token: int, n: int, prompt_id: int, what: str) -> int:
    position = token + n if token < 0 else token
    if not 0 <= position < n:
        raise TdbqlError(f"patch position {token} is outside {what} of pair {prompt_id}")
    return position


def edit_hook(location: str, edits: Sequence[Edits], source: torch.Tensor):
    """A hook writing `source` values into the activation at every edit (x cloned: autograd-safe)."""

    def hook(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for e in edits:
            write(x, location, e, source.to(x.dtype))
        return x

    return hook


def write(x: torch.Tensor, location: str, e: Edits, source: torch.Tensor | None) -> None:
    """x[run index] = source[source index], or 0 where `source` is None. Layouts: attn.probs is
    (batch, head, token, key); attn.z (batch, token, head, d_head); units are the last dim of
    mlp.post and latents; the rest are (batch, token, d)."""
    if location == "attn.probs":
        if e.key is None:  # a head at a query token, every key
            x[e.rows, e.unit, e.positions] = 0 if source is None else source[e.source_rows, e.unit, e.source_positions]
        else:
            x[e.rows, e.unit, e.positions, e.key] = (
                0 if source is None else source[e.source_rows, e.unit, e.source_positions, e.source_key])
    elif e.unit is None:
        x[e.rows, e.positions] = 0 if source is None else source[e.source_rows, e.source_positions]
    else:
        x[e.rows, e.positions, e.unit] = 0 if source is None else source[e.source_rows, e.source_positions, e.unit]


def capture(loaded, batch: Batch, locations, hooks: HookSet | None = None) -> dict:
    """One forward of `batch` without autograd keeping the tensors at `locations` ((location,
    layer) pairs); the logits at each prompt's last token under the key "last_logits"."""
    hooks = hooks or HookSet()
    kept: dict = {}
    for location, layer in sorted(locations, key=lambda x: (x[1] is None, x[1] or 0, x[0])):
        hooks.add(location, layer, _keeper(kept, (location, layer)))
    with torch.no_grad():
        kept["last_logits"] = loaded.model(batch.input_ids, batch.attention_mask, hooks,
                                           logit_positions=batch.lengths - 1)[:, 0]
    return kept


def _keeper(kept: dict, key):
    def hook(x: torch.Tensor) -> None:
        kept[key] = x.detach()

    return hook


class Interventions:
    """What a pass adds before its own hooks: the ablations, the patch, then the steers."""

    def __init__(self, ablations: Sequence[AblationSpec] = (), means: dict | None = None,
                 patcher: Patcher | None = None, steers: Sequence[SteerSpec] = ()) -> None:
        self.ablations, self.means, self.patcher = tuple(ablations), means or {}, patcher
        self.steers = tuple(steers)

    def add(self, hooks: HookSet, batch: Batch) -> None:
        add_ablations(hooks, self.ablations, batch, self.means)
        if self.patcher is not None:
            self.patcher.add(hooks, batch)
        add_steers(hooks, self.steers, batch)

    def decoding(self) -> Interventions:
        """What still applies to a token `generate` appends: the ablations and steers that name no
        position (a head's mean pattern has no row for it); a patch has no source there."""
        every_token = [a for a in self.ablations if a.token is None and not (a.heads and a.value == "mean")]
        return Interventions(every_token, self.means, None, [s for s in self.steers if s.token is None])

    def __bool__(self) -> bool:
        return bool(self.ablations) or self.patcher is not None or bool(self.steers)
