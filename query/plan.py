"""The plan IR: the contract between grammar/, the binder, executor/ and shell/.

Every statement of the language parses to one frozen pydantic model below. Plans are immutable,
hashable, and round-trip through JSON (`Statement` is a discriminated union on `kind`). The
closed sets of names come from the catalog; the binder (bind.py) checks a plan against a model.

Conventions
- Layers, heads, neurons and latents are 0-based. Token positions may be negative (from the end).
- `Range(lo, hi)` is inclusive at both ends, like SQL's BETWEEN.
- Components name the kind of node a row describes (see `Component`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from . import catalog


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- the closed sets of names, typed from the catalog (catalog.py says what each means) ---------------

# `of` components: a bound plan holds the components whose rows the query computes (`sae` expanded
# to the loaded latents, error rows added for sae_error); see catalog.row_components
Component = Literal[catalog.WRITTEN_COMPONENTS]
NodeKind = Literal[tuple(catalog.NODE_REFS)]  # mlp[L,N], attn[L,H], sae[L,I], resid[L], block[L], ...
SaeSite = Literal[catalog.SAE_SITES]
GroupKey = Literal[catalog.GROUP_KEYS]
Reduction = Literal[catalog.REDUCTIONS]
Dtype = Literal[catalog.DTYPES]
TracePath = Literal[catalog.TRACE_PATHS]
ResidualLocation = Literal[catalog.RESIDUAL_LOCATIONS]
Source = Literal[catalog.SOURCES]
SweepKind = Literal[tuple(catalog.SWEEPS)]


class Range(Node):
    """Inclusive integer range `lo..hi`."""

    lo: int
    hi: int


Scalar = int | float | str | bool


class Condition(Node):
    """`field op value`, e.g. `layer in 3..7`, `token = -1`, `head in (1, 3)`, `act > 0`."""

    field: str
    op: Literal["=", "!=", "<", "<=", ">", ">=", "in"]
    value: int | float | str | Range | tuple[int, ...]


class NodeRef(Node):
    """`mlp[L,N]`, `attn[L,H]`, `sae[L,I]` (or `mlp_sae[..]`/`attn_sae[..]`/`resid_sae[..]`),
    `resid[L]`, each with an optional `@token`; attention may name a key token with `@t:u`.

    `index` is None only for `resid` and `block`, and in `upvoted`, where `mlp[L]` / `attn[L]`
    name the sublayer's whole write and `block[L]` the layer's whole update
    (resid.post - resid.pre). `token` None means every token.
    """

    component: NodeKind  # `sae` only before binding
    layer: int
    index: int | None = None
    token: int | None = None
    key: int | None = None


class ScalarSpec(Node):
    """A scalar to compute, with optional parameters: `contribution(norm=2)`."""

    name: str
    params: tuple[tuple[str, Scalar], ...] = ()

    def param(self, key: str, default: Scalar | None = None) -> Scalar | None:
        return dict(self.params).get(key, default)


class Ablation(Node):
    """`mlp[3,1024]=0`, `attn[2,5]@4=0`, `sae[1,7]=mean` (the mean over the prompt set)."""

    node: NodeRef
    value: float | Literal["mean"]


class Patch(Node):
    """`patch attn[3,1], resid.pre[2]@-1 from clean`: each pair's other prompt runs with these
    activations taken from `source` (clean: the corrupt prompt runs, denoising; corrupt: the clean
    prompt runs, noising). Positions align from the end of each prompt."""

    nodes: tuple[NodeRef, ...]
    source: Source


class Direction(Node):
    """One term of a steering direction, in the residual basis: `latent(mlp_L1, 123)` (an
    autoencoder latent's decoder row), `unembed(" Paris")` (the token's unembedding column),
    `mean(clean)` / `mean(corrupt)` (the mean activation at the steered site over that side of the
    session's prompts). `sign` -1 subtracts it."""

    kind: Literal["latent", "unembed", "mean"]
    sign: Literal[1, -1] = 1
    site: SaeSite | None = None  # latent
    layer: int | None = None  # latent
    index: int | None = None  # latent
    token: str | None = None  # unembed
    side: Source | None = None  # mean


class Steer(Node):
    """`steer resid.pre[3]@-1 += 4.0 * latent(mlp_L1, 123)`: add `scale` times the sum of `terms`
    to the activation at `node` (every position, or `@t`)."""

    node: NodeRef
    scale: float = 1.0
    terms: tuple[Direction, ...]


class Trace(Node):
    """`trace mlp[5,100]@7` or `trace attn[3,2]@7:4 via q`: replace the loss by the node's
    pre-activation (layer-norm scale detached). Attention traces the QK logit and may be
    restricted to the Q, K or V path."""

    node: NodeRef
    via: TracePath | None = None


class Loss(Node):
    """`target " Mary" vs " John"` (logit difference, lists averaged as TDB does),
    `target logprob " Mary"`. Token strings must each be a single token (checked when binding)."""

    kind: Literal["logit_diff", "logprob"] = "logit_diff"
    targets: tuple[str, ...]
    distractors: tuple[str, ...] = ()


# --- statements -------------------------------------------------------------------------------


class ModelStmt(Node):
    kind: Literal["model"] = "model"
    name: str  # a registry name (gpt2-small), a local HF folder, a hub id, or "default"
    dtype: Dtype | None = None
    device: str | None = None


class SaeStmt(Node):
    kind: Literal["sae"] = "sae"
    site: SaeSite
    path: str


class PromptStmt(Node):
    """`prompt "a", "b" corrupt "b2"`: `corrupts` holds each text's corrupted prompt (None: not a
    pair); empty when no text has one."""

    kind: Literal["prompt"] = "prompt"
    texts: tuple[str, ...]
    corrupts: tuple[str | None, ...] = ()


class PromptsFromFile(Node):
    """`prompts from 'ioi.jsonl'` (jsonl/csv/parquet; columns prompt, target, distractor)."""

    kind: Literal["prompts_file"] = "prompts_file"
    path: str


class PromptsFromSql(Node):
    """`prompts from (select text as prompt from t limit 100)`."""

    kind: Literal["prompts_sql"] = "prompts_sql"
    sql: str


class TargetStmt(Node):
    kind: Literal["target"] = "target"
    loss: Loss


class SetStmt(Node):
    """`set batch_size = 16`, `set freeze_ln_f = off`, `set device = 'cuda'`."""

    kind: Literal["set"] = "set"
    name: str
    value: Scalar


class NodeQuery(Node):
    """`topk 20 act_times_grad, act of mlp, attn where layer in 3..7 by layer
    ablate mlp[3,1024]=0 trace mlp[5,100]@7 over prompts mean as t`.

    mode `select` returns dense rows (k is None). The first scalar ranks; all are reported.
    Empty `components` (before binding) means the defaults for the session (the catalog's
    DEFAULT_COMPONENTS plus the loaded autoencoders' latents).
    """

    kind: Literal["nodes"] = "nodes"
    mode: Literal["topk", "bottomk", "select"]
    k: int | None = None
    scalars: tuple[ScalarSpec, ...]
    components: tuple[Component, ...] = ()
    where: tuple[Condition, ...] = ()
    by: tuple[GroupKey, ...] = ()
    ablations: tuple[Ablation, ...] = ()
    trace: Trace | None = None
    over_prompts: Reduction | None = None
    target: Loss | None = None  # overrides the session target for this query
    patch: Patch | None = None
    steers: tuple[Steer, ...] = ()
    verify: bool = False  # add actual_effect: the real intervention for each ranked row
    name: str | None = None


class LogitsQuery(Node):
    """`logits where token = -1 topk 10`; `logprobs ...` sets `logprobs`."""

    kind: Literal["logits"] = "logits"
    logprobs: bool = False
    k: int = 10
    where: tuple[Condition, ...] = ()
    ablations: tuple[Ablation, ...] = ()
    patch: Patch | None = None
    steers: tuple[Steer, ...] = ()
    name: str | None = None


class LogitLensQuery(Node):
    """`logit_lens where token = -1 and layer in 2..3 topk 5 [ln_f off] [at resid.mid]`.

    Rows per (prompt, layer, position, top-k vocab item), with the rank change against the
    previous location."""

    kind: Literal["logit_lens"] = "logit_lens"
    k: int = 10
    where: tuple[Condition, ...] = ()
    use_ln_f: bool = True
    at: ResidualLocation = "resid.post"
    ablations: tuple[Ablation, ...] = ()
    patch: Patch | None = None
    steers: tuple[Steer, ...] = ()
    name: str | None = None


class UpvotedQuery(Node):
    """`upvoted mlp[3,100] topk 10`, `upvoted attn[2,5]@-1`, `upvoted block[3]`: tokens a node's
    write promotes (and demotes: bottomk) through the unembedding. `raw` uses the output row
    without the activation."""

    kind: Literal["upvoted"] = "upvoted"
    node: NodeRef
    k: int = 10
    bottom: bool = False
    raw: bool = False
    name: str | None = None


class RoutesQuery(Node):
    """`routes threshold 0.04 renormalize on from token -1 mode cell`: LLM-TT's graph. The
    defaults are LLM-TT's (threshold 0.04, "renormalize after threshold" on, per cell)."""

    kind: Literal["routes"] = "routes"
    threshold: float = 0.04
    renormalize: bool = True
    from_token: int | None = None
    threshold_mode: Literal["cell", "edge"] = "cell"
    norm: Literal[1, 2] = 1
    ablations: tuple[Ablation, ...] = ()
    patch: Patch | None = None
    steers: tuple[Steer, ...] = ()
    name: str | None = None


class MetricQuery(Node):
    """`metric [ablate ...] [patch ...] [by prompt | over prompts mean] [as NAME]`: the target
    (logit difference or logprob at the last token) per prompt, or reduced over prompts: on the
    clean prompt, on the corrupt one (pairs), and under the statement's interventions."""

    kind: Literal["metric"] = "metric"
    ablations: tuple[Ablation, ...] = ()
    patch: Patch | None = None
    steers: tuple[Steer, ...] = ()
    by: tuple[GroupKey, ...] = ()
    over_prompts: Reduction | None = None
    target: Loss | None = None
    name: str | None = None


class PatchingQuery(Node):
    """`patching of head from clean [by position] [where ...]`: a patching sweep, each component
    (and position) patched alone from `source` into the other prompt of each pair; one row per
    component with the metric clean, corrupt, patched and the share recovered."""

    kind: Literal["patching"] = "patching"
    of: SweepKind
    source: Source
    where: tuple[Condition, ...] = ()
    by: tuple[GroupKey, ...] = ()
    ablations: tuple[Ablation, ...] = ()
    steers: tuple[Steer, ...] = ()
    over_prompts: Reduction | None = None
    target: Loss | None = None
    name: str | None = None


class GenerateQuery(Node):
    """`generate 20 [temperature 0.8] [seed 1] [ablate ...] [patch ...] [steer ...]`: continue
    each prompt (the running one of each pair under a patch) by `n` tokens, greedily at
    temperature 0, under the statement's interventions."""

    kind: Literal["generate"] = "generate"
    n: int
    temperature: float = 0.0
    seed: int | None = None
    ablations: tuple[Ablation, ...] = ()
    patch: Patch | None = None
    steers: tuple[Steer, ...] = ()
    name: str | None = None


class SqlStmt(Node):
    """Anything that starts with a SQL keyword goes to DuckDB unchanged."""

    kind: Literal["sql"] = "sql"
    text: str


QUERY_TYPES = (NodeQuery, LogitsQuery, LogitLensQuery, UpvotedQuery, RoutesQuery, MetricQuery, PatchingQuery,
               GenerateQuery)
Query = Annotated[Union[QUERY_TYPES], Field(discriminator="kind")]


class BoundQuery(Node):
    """A model query the binder has checked against a model (query/bind.py), with its loss
    resolved (the query's own target, else the session's): the only input the engine runs or
    explains (`explain` True: the statement was `explain QUERY`); it does not check again."""

    query: Query
    loss: Loss | None = None
    explain: bool = False


class ExplainStmt(Node):
    kind: Literal["explain"] = "explain"
    query: Query


Statement = Annotated[
    Union[
        ModelStmt,
        SaeStmt,
        PromptStmt,
        PromptsFromFile,
        PromptsFromSql,
        TargetStmt,
        SetStmt,
        NodeQuery,
        LogitsQuery,
        LogitLensQuery,
        UpvotedQuery,
        RoutesQuery,
        MetricQuery,
        PatchingQuery,
        GenerateQuery,
        ExplainStmt,
        SqlStmt,
    ],
    Field(discriminator="kind"),
]



class Span(Node):
    """Where a statement came from: kept beside the IR (not in it) so equal plans hash equal."""

    line: int
    column: int
    end_line: int
    end_column: int
    start_pos: int
    end_pos: int
