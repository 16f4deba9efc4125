"""The binder's checks of steering and generation (see bind.py for the rest).

A steer adds to a residual-width activation: `resid.pre[L]`, `resid.mid[L]`, `resid[L]`, or a
sublayer's whole write `mlp[L]` / `attn[L]`, every position or `@t`. Every direction is a
residual-basis vector (d_model), so any direction fits any of those sites: a latent of a loaded
autoencoder (its decoder row, through W_out for an MLP autoencoder), a single-token unembedding
column, or the mean activation at the site over one side of the prompt pairs.
"""

from __future__ import annotations

from . import catalog
from .plan import Direction, GenerateQuery, Steer

STEER_SITES = (*catalog.RESIDUALS, "mlp", "attn")


class SteerChecks:
    """Mixed into the binder: needs its `fail`, `node_ref`, `single_token`, `sae_layers`,
    `ablation` and `patch`."""

    def steers(self, steers: tuple[Steer, ...]) -> tuple[Steer, ...]:
        return tuple(self.steer(s) for s in steers)

    def steer(self, steer: Steer) -> Steer:
        node = steer.node
        if node.component not in STEER_SITES or node.index is not None:
            raise self.fail("steer adds a direction to a residual-width activation: resid.pre[L], resid.mid[L], "
                            "resid[L], mlp[L] or attn[L]", r"\bsteer\b")
        if not -1e30 < steer.scale < 1e30:
            raise self.fail(f"steer scale {steer.scale} is out of range (|scale| < 1e30)", r"\bsteer\b")
        return steer.model_copy(update={"node": self.node_ref(node),
                                        "terms": tuple(self.direction(d) for d in steer.terms)})

    def direction(self, direction: Direction) -> Direction:
        if direction.kind == "unembed":
            self.single_token(direction.token, "unembed token")
        elif direction.kind == "latent":
            self.latent_direction(direction)
        return direction

    def latent_direction(self, direction: Direction) -> None:
        name = f"{direction.site}_L{direction.layer}"
        near = rf"\blatent\s*\(\s*(?P<at>{name}\b)"
        layers = self.sae_layers.get(catalog.latent_component(direction.site), {})
        if direction.layer not in layers:
            loaded = ", ".join(f"{c.removesuffix('_sae')}_L{layer}" for c, ls in self.sae_layers.items()
                               for layer in sorted(ls)) or "none"
            raise self.fail(f"latent({name}, ...): no {direction.site} autoencoder is loaded at layer "
                            f"{direction.layer} (loaded: {loaded})", near)
        n = layers[direction.layer]
        if not 0 <= direction.index < n:
            raise self.fail(f"latent({name}, {direction.index}) is out of range: that autoencoder has {n} "
                            f"latents (0..{n - 1})", near)

    def visit_GenerateQuery(self, query: GenerateQuery) -> GenerateQuery:
        if not 0 <= query.temperature <= 100:
            raise self.fail(f"temperature must be between 0 (greedy) and 100, not {query.temperature}",
                            r"\btemperature\b")
        if query.n > self.info.n_ctx:
            raise self.fail(f"generate {query.n} is beyond the model's context of {self.info.n_ctx} tokens",
                            r"\bgenerate\b")
        return query.model_copy(update={
            "ablations": tuple(self.ablation(a) for a in query.ablations),
            "patch": self.patch(query.patch),
            "steers": self.steers(query.steers),
        })


def uses_corrupt_means(query) -> bool:
    """Whether a query's steers read the corrupt prompts (so it needs prompt pairs)."""
    return any(d.kind == "mean" and d.side == "corrupt" for s in getattr(query, "steers", ()) for d in s.terms)
