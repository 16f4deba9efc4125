"""What binding and execution are given besides a statement: the loaded model's shape and the prompts.

The executor builds `ModelInfo` from a loaded model; the shell builds `PromptRow`s from prompt
statements and files. Both are frozen, like the plan.
"""

from __future__ import annotations

from .plan import Node, SaeSite


class ModelInfo(Node):
    """The shape of a loaded model, as the binder sees it (built by the executor)."""

    name: str
    arch: str
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    sae_latents: tuple[tuple[SaeSite, int, int], ...] = ()  # (site, layer, n_latents)


class PromptRow(Node):
    """One prompt as the executor receives it; target/distractor override the session loss."""

    prompt_id: int
    text: str
    target: str | None = None
    distractor: str | None = None
    corrupt: str | None = None  # the corrupted prompt of the pair (`prompt "..." corrupt "..."`)


# A result table's schema metadata may carry a note for the user under this key (verify's rank
# correlation); the session prints it under the table.
NOTE_KEY = b"tdbql.note"
