"""Hook points: every activation location of the transformer, with its named dimensions.

The model calls `hooks(location, layer, x)` at each location below and continues with whatever
tensor comes back. A hook may read `x`, register a gradient hook on it, detach it (to stop
gradients, e.g. freezing a layer-norm scale), or return an edited copy (ablation). Layer is None
for locations outside the blocks (`resid.embed`, `ln_f.scale`, `logits`).

This is the idea of TDB's component registry without its enum sprawl: one table of names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

# location -> named dimensions of the tensor passed to hooks at that location.
# "key" is the attended-to token; "kv_head" is a key/value head (grouped-query attention).
LOCATIONS: dict[str, tuple[str, ...]] = {
    "resid.embed": ("batch", "token", "d_model"),  # token (+ position) embedding; block 0 input
    "resid.pre": ("batch", "token", "d_model"),  # input of block L
    "ln1.scale": ("batch", "token", "one"),  # σ (LayerNorm) or rms (RMSNorm) before attention
    "q_norm.scale": ("batch", "token", "head", "one"),  # q/k norm (Qwen3, Gemma 3: per head; OLMo 2:
    "k_norm.scale": ("batch", "token", "kv_head", "one"),  # over all heads, repeated per head)
    "attn.q": ("batch", "token", "head", "d_head"),  # after rotary
    "attn.k": ("batch", "token", "kv_head", "d_head"),  # after rotary
    "attn.v": ("batch", "token", "kv_head", "d_head"),
    "attn.logits": ("batch", "head", "token", "key"),  # what the softmax reads: scaled, soft-capped, masked
    "attn.probs": ("batch", "head", "token", "key"),
    "attn.z": ("batch", "token", "head", "d_head"),  # sum_u A[t,u] v[u], per head
    "ln1_post.scale": ("batch", "token", "one"),  # the norm of attention's output (post-norm families)
    "attn.out": ("batch", "token", "d_model"),  # attention's write to the residual (with bias; after ln1_post)
    "resid.mid": ("batch", "token", "d_model"),  # resid.pre + attn.out
    "ln2.scale": ("batch", "token", "one"),
    "mlp.in": ("batch", "token", "d_model"),  # the MLP's input (after ln2; a transcoder reads it)
    "mlp.pre": ("batch", "token", "d_mlp"),  # pre-activation (the gate branch for GLU MLPs)
    "mlp.post": ("batch", "token", "d_mlp"),  # what W_out reads (act(gate) * up for GLU)
    "ln2_post.scale": ("batch", "token", "one"),  # the norm of the MLP's output (post-norm families)
    "mlp.out": ("batch", "token", "d_model"),  # MLP's write to the residual (with bias; after ln2_post)
    "resid.post": ("batch", "token", "d_model"),  # output of block L
    "ln_f.scale": ("batch", "token", "one"),
    "logits": ("batch", "token", "vocab"),
    # autoencoders spliced into the forward (present only when one is attached at that site)
    "sae.mlp.latent": ("batch", "token", "latent"),
    "sae.mlp.error": ("batch", "token", "d_mlp"),
    "sae.attn.latent": ("batch", "token", "latent"),
    "sae.attn.error": ("batch", "token", "d_model"),
    "sae.resid.latent": ("batch", "token", "latent"),
    "sae.resid.error": ("batch", "token", "d_model"),
    # a transcoder in place of the MLP: latents, and the MLP's true output minus the transcoder's
    "sae.mlp_tc.latent": ("batch", "token", "latent"),
    "sae.mlp_tc.error": ("batch", "token", "d_model"),
    # an autoencoder that normalises its input: what its output is divided by (SAELens'
    # constant_norm_rescale: sqrt(d_in) / |x|; layer_norm: 1 / std), so a latent's write is z·D / this
    "sae.mlp.scale": ("batch", "token", "one"),
    "sae.attn.scale": ("batch", "token", "one"),
    "sae.resid.scale": ("batch", "token", "one"),
}

def location_shape(location: str, layer: int | None, cfg, saes: dict, n_tokens: int, n_prompts: int = 1) -> tuple[int, ...]:
    """Shape of the tensor at (location, layer) for `n_prompts` prompts padded to `n_tokens`
    tokens; `cfg` is the ModelConfig, `saes` the attached autoencoders by (site, layer)."""
    sizes = {
        "batch": n_prompts, "token": n_tokens, "key": n_tokens, "d_model": cfg.d_model, "d_mlp": cfg.d_mlp,
        "head": cfg.n_heads, "kv_head": cfg.n_kv_heads, "d_head": cfg.d_head, "one": 1, "vocab": cfg.vocab_size,
    }
    if location.startswith("sae."):
        ae = saes.get((location.split(".")[1], layer))
        sizes["latent"] = ae.n_latents if ae is not None else 0
    return tuple(sizes[dim] for dim in LOCATIONS[location])


GLOBAL_LOCATIONS = frozenset({"resid.embed", "ln_f.scale", "logits"})

Hook = Callable[[torch.Tensor], "torch.Tensor | None"]


class HookSet:
    """Hooks keyed by (location, layer); called in registration order."""

    def __init__(self) -> None:
        self._hooks: dict[tuple[str, int | None], list[Hook]] = defaultdict(list)

    def add(self, location: str, layer: int | None, hook: Hook) -> None:
        if location not in LOCATIONS:
            raise KeyError(f"unknown hook location {location!r}")
        if (location in GLOBAL_LOCATIONS) != (layer is None):
            raise ValueError(f"{location!r} takes layer={'None' if location in GLOBAL_LOCATIONS else 'an int'}")
        self._hooks[(location, layer)].append(hook)

    def has(self, location: str, layer: int | None) -> bool:
        return (location, layer) in self._hooks

    def keys(self) -> Iterable[tuple[str, int | None]]:
        return self._hooks.keys()

    def __call__(self, location: str, layer: int | None, x: torch.Tensor) -> torch.Tensor:
        for hook in self._hooks.get((location, layer), ()):
            out = hook(x)
            if out is not None:
                x = out
        return x


NO_HOOKS = HookSet()
