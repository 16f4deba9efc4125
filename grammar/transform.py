"""The lark Transformer: parse trees of tdbql.lark -> plan objects (tdbql.query.plan).

Open-class words (scalars, components, group keys, reductions, ...) are NAME tokens in the grammar
and are checked here, so a misspelling gets "unknown scalar 'x'; did you mean 'y'?". Errors are
raised as `NameProblem` with the token's offset in the statement; parse.py turns them into
TdbqlError with line and column in the whole program.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lark import Token, Transformer, Tree, v_args

from ..query import catalog, plan
from ..query.errors import nearest
from ..query.plan import (
    Ablation,
    Condition,
    Direction,
    Loss,
    NodeRef,
    Patch,
    Range,
    ScalarSpec,
    Steer,
    Trace,
)


class NameProblem(Exception):
    """A semantic problem found while building the plan, at `pos` in the statement text."""

    def __init__(self, message: str, pos: int, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.suggestion = suggestion


def choose(token: Token, choices: Sequence[str], what: str) -> str:
    """The lower-cased word of `token` if it is one of `choices`, else a NameProblem."""
    word = str(token).lower()
    if word in choices:
        return word
    suggestion = nearest(word, choices)
    listed = "" if suggestion or len(choices) > 8 else f" (one of {', '.join(choices)})"
    raise NameProblem(f"unknown {what} '{token}'{listed}", token.start_pos, suggestion)


def unquote(token: Token) -> str:
    """The value of a STRING token: quotes removed, backslash escapes decoded."""
    body, out, i = str(token)[1:-1], [], 0
    escapes = {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            out.append(escapes.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def literal(token: Token) -> int | float | str:
    if token.type == "INT":
        return int(token)
    if token.type == "FLOAT":
        return float(token)
    if token.type == "STRING":
        return unquote(token)
    return str(token)


def positive(token: Token, what: str = "k") -> int:
    value = int(token)
    if value < 1:
        raise NameProblem(f"{what} must be at least 1, got {value}", token.start_pos)
    return value


def switch(token: Token, what: str) -> bool:
    value = catalog.switch_value(token)
    if value is None:
        raise NameProblem(f"unknown {what} '{token}' (on or off)", token.start_pos)
    return value


@dataclass(frozen=True)
class Clause:
    """A query clause before it is folded into its statement: it sets the field `name`."""

    name: str
    value: object
    pos: int  # offset in the statement, for errors
    label: str = ""  # the keyword as written in messages, when it differs from `name`


def fold(clauses: Sequence[Clause]) -> dict[str, object]:
    """Clauses -> constructor fields; each clause at most once."""
    fields: dict[str, object] = {}
    for clause in clauses:
        if clause.name in fields:
            raise NameProblem(f"'{clause.label or clause.name}' is given twice", clause.pos)
        fields[clause.name] = clause.value
    return fields


@v_args(inline=True)
class ToPlan(Transformer):
    """Builds one Statement from the tree of one statement."""

    # --- session statements ---

    def model_stmt(self, name: Token, *options: tuple[str, str]) -> plan.ModelStmt:
        fields: dict[str, str] = {}
        for key, value, pos in options:
            if key in fields:
                raise NameProblem(f"'{key}' is given twice", pos)
            fields[key] = value
        path = _path(name)
        return plan.ModelStmt(name="default" if path.lower() == "default" else path, **fields)

    def dtype_opt(self, token: Token) -> tuple[str, str, int]:
        return ("dtype", choose(token, catalog.DTYPES, "dtype"), token.start_pos)

    def device_opt(self, token: Token) -> tuple[str, str, int]:
        return ("device", _path(token), token.start_pos)

    def sae_stmt(self, site: Token, path: Token) -> plan.SaeStmt:
        return plan.SaeStmt(site=choose(site, catalog.SAE_SITES, "autoencoder site"), path=_path(path))

    def prompt_stmt(self, *items: tuple[str, str | None]) -> plan.PromptStmt:
        texts = tuple(text for text, _ in items)
        corrupts = tuple(corrupt for _, corrupt in items)
        return plan.PromptStmt(texts=texts, corrupts=corrupts if any(c is not None for c in corrupts) else ())

    def prompt_item(self, text: Token, corrupt: Token | None = None) -> tuple[str, str | None]:
        return unquote(text), None if corrupt is None else unquote(corrupt)

    def prompts_file(self, path: Token) -> plan.PromptsFromFile:
        return plan.PromptsFromFile(path=_path(path))

    def prompts_sql(self, subquery: Token) -> plan.PromptsFromSql:
        sql = str(subquery)[1:-1].strip()
        if not sql:
            raise NameProblem("empty subquery: write prompts from (select ... from ...)", subquery.start_pos)
        return plan.PromptsFromSql(sql=sql)

    def target_stmt(self, loss: Loss) -> plan.TargetStmt:
        return plan.TargetStmt(loss=loss)

    def logit_diff(self, targets: tuple[str, ...], distractors: tuple[str, ...] = ()) -> Loss:
        return Loss(kind="logit_diff", targets=targets, distractors=distractors)

    def logprob(self, targets: tuple[str, ...]) -> Loss:
        return Loss(kind="logprob", targets=targets)

    def strings(self, *tokens: Token) -> tuple[str, ...]:
        return tuple(unquote(token) for token in tokens)

    def set_stmt(self, name: Token, value: Token) -> plan.SetStmt:
        parsed: plan.Scalar = literal(value)
        if value.type == "NAME" and catalog.switch_value(value) is not None:
            parsed = catalog.switch_value(value)
        return plan.SetStmt(name=str(name).lower(), value=parsed)

    def explain_stmt(self, query: object) -> plan.ExplainStmt:
        return plan.ExplainStmt(query=query)

    # --- node queries ---

    def node_query(self, rank: tuple[str, int | None], *items: object) -> plan.NodeQuery:
        scalars = tuple(item for item in items if isinstance(item, ScalarSpec))
        clauses = [item for item in items if isinstance(item, Clause)]
        mode, k = rank
        return plan.NodeQuery(mode=mode, k=k, scalars=scalars, **fold(clauses))

    def topk(self, k: Token) -> tuple[str, int]:
        return ("topk", positive(k))

    def bottomk(self, k: Token) -> tuple[str, int]:
        return ("bottomk", positive(k))

    def select(self) -> tuple[str, None]:
        return ("select", None)

    def scalar(self, name: Token, *params: tuple[str, plan.Scalar, int]) -> ScalarSpec:
        seen: set[str] = set()
        for key, _, pos in params:
            if key in seen:
                raise NameProblem(f"parameter '{key}' is given twice", pos)
            seen.add(key)
        return ScalarSpec(name=choose(name, catalog.SCALAR_NAMES, "scalar"), params=tuple(p[:2] for p in params))

    def param(self, key: Token, value: Token) -> tuple[str, plan.Scalar, int]:
        return (str(key).lower(), literal(value), key.start_pos)

    def of_clause(self, *names: Token) -> Clause:
        components = tuple(dict.fromkeys(choose(n, catalog.WRITTEN_COMPONENTS, "component") for n in names))
        return Clause("components", components, names[0].start_pos, "of")

    def by_clause(self, *names: Token) -> Clause:
        words = catalog.GROUP_KEYS + catalog.POSITION_WORDS
        keys = [choose(n, words, "group key") for n in names]
        keys = tuple(dict.fromkeys("token" if k in catalog.POSITION_WORDS else k for k in keys))
        return Clause("by", keys, names[0].start_pos)

    @v_args(meta=True)
    def trace_clause(self, meta, children: list) -> Clause:
        node, via = children[0], (children[1] if len(children) > 1 else None)
        _needs_index(node, meta.start_pos)
        path = choose(via, catalog.TRACE_PATHS, "trace path") if via is not None else None
        if path is not None and node.component != "attn":
            raise NameProblem(f"'via {path}' applies to attention heads, not {node.component}", via.start_pos)
        return Clause("trace", Trace(node=node, via=path), meta.start_pos)

    def over_clause(self, reduction: Token) -> Clause:
        return Clause("over_prompts", choose(reduction, catalog.REDUCTIONS, "reduction"), reduction.start_pos, "over")

    @v_args(meta=True)
    def target_clause(self, meta, children: list) -> Clause:
        return Clause("target", children[0], meta.start_pos)

    def as_clause(self, name: Token) -> Clause:
        return Clause("name", str(name), name.start_pos, "as")

    # --- where ---

    @v_args(meta=True)
    def where_clause(self, meta, conditions: list) -> Clause:
        return Clause("where", tuple(conditions), meta.start_pos)

    def compare(self, field: Token, op: str, value: Token) -> Condition:
        parsed = literal(value)
        if value.type == "NAME":
            parsed = parsed.lower()  # type: ignore[union-attr]
        return Condition(field=str(field).lower(), op="!=" if op == "<>" else op, value=parsed)

    def op(self, token: Token) -> str:
        return str(token)

    def in_range(self, field: Token, lo: Token, hi: Token) -> Condition:
        if int(lo) > int(hi):
            raise NameProblem(f"empty range {lo}..{hi}: the first bound must not exceed the second", lo.start_pos)
        return Condition(field=str(field).lower(), op="in", value=Range(lo=int(lo), hi=int(hi)))

    def in_list(self, field: Token, *values: Token) -> Condition:
        return Condition(field=str(field).lower(), op="in", value=tuple(int(v) for v in values))

    # --- ablation and node references ---

    @v_args(meta=True)
    def ablate_clause(self, meta, ablations: list) -> Clause:
        return Clause("ablations", tuple(ablations), meta.start_pos, "ablate")

    @v_args(meta=True)
    def ablation(self, meta, children: list) -> Ablation:
        node, value = children
        _needs_index(node, meta.start_pos)
        return Ablation(node=node, value="mean" if value.type == "MEAN" else float(value))

    def short_ref(self, name: Token, layer: Token, *rest: object) -> NodeRef:
        component = choose(name, tuple(catalog.NODE_REFS), "node kind")
        indices = [int(item) for item in rest if isinstance(item, Token)]
        at = next((item for item in rest if isinstance(item, tuple)), (None, None))
        index = catalog.NODE_REFS[component]
        if index == "none" and indices:
            raise NameProblem(f"{component} takes a layer only: {component}[L]", name.start_pos)
        if index == "required" and not indices:
            raise NameProblem(f"{component} takes a layer and an index: {component}[L,I]", name.start_pos)
        return _node_ref(component, int(layer), indices[0] if indices else None, at, name.start_pos)

    def hook_ref(self, hook: Token, *rest: object) -> NodeRef:
        _, layer_text, suffix = str(hook).split(".", 2)
        found = catalog.hook_node(suffix)
        if found is None:
            suggestion = nearest(suffix, catalog.node_hook_names())
            raise NameProblem(
                f"unknown hook name '{hook}'", hook.start_pos,
                f"blocks.{layer_text}.{suggestion}" if suggestion else None,
            )
        component, component_whole = found
        indices = [int(item) for item in rest if isinstance(item, Token)]
        at = next((item for item in rest if isinstance(item, tuple)), (None, None))
        if component_whole and indices:
            raise NameProblem(f"{hook} takes no index", hook.start_pos)
        if not component_whole and not indices:
            raise NameProblem(f"{hook} needs an index: {hook}[N]", hook.start_pos)
        return _node_ref(component, int(layer_text), indices[0] if indices else None, at, hook.start_pos)

    def location_ref(self, location: Token, layer: Token, *rest: object) -> NodeRef:
        at = next((item for item in rest if isinstance(item, tuple)), (None, None))
        kind = catalog.residual_kind(str(location).lower())
        return _node_ref(kind, int(layer), None, at, location.start_pos)

    @v_args(meta=True)
    def patch_clause(self, meta, children: list) -> Clause:
        *nodes, source = children
        patch = Patch(nodes=tuple(nodes), source=choose(source, catalog.SOURCES, "patch source"))
        return Clause("patch", patch, meta.start_pos, "patch")

    @v_args(meta=True)
    def verify_clause(self, meta, children: list) -> Clause:
        return Clause("verify", True, meta.start_pos)

    @v_args(meta=True)
    def steer_clause(self, meta, steers: list) -> Clause:
        return Clause("steers", tuple(steers), meta.start_pos, "steer")

    def steer(self, node: NodeRef, *rest: object) -> Steer:
        scale = next((item for item in rest if isinstance(item, float)), 1.0)
        terms = next(item for item in rest if isinstance(item, tuple))
        return Steer(node=node, scale=scale, terms=terms)

    def scale(self, value: Token) -> float:
        return float(value)

    def direction_sum(self, *items: object) -> tuple[Direction, ...]:
        if len(items) == 1 and isinstance(items[0], tuple):  # parenthesised
            return items[0]
        terms, sign = [], 1
        for item in items:
            if isinstance(item, Token):
                sign = -1 if str(item) == "-" else 1
            else:
                terms.append(item.model_copy(update={"sign": sign}))
                sign = 1
        return tuple(terms)

    def latent_direction(self, name: Token, index: Token) -> Direction:
        sites = "|".join(sorted(catalog.SAE_SITES, key=len, reverse=True))  # mlp_tc before mlp
        match = re.fullmatch(rf"({sites})_l(\d+)", str(name).lower())
        if match is None:
            raise NameProblem(f"latent(SITE_L<layer>, index) names an autoencoder like mlp_L1, not '{name}'",
                              name.start_pos)
        return Direction(kind="latent", site=match.group(1), layer=int(match.group(2)), index=int(index))

    def unembed_direction(self, token: Token) -> Direction:
        return Direction(kind="unembed", token=unquote(token))

    def mean_direction(self, _mean: Token, side: Token) -> Direction:
        return Direction(kind="mean", side=choose(side, catalog.SOURCES, "prompt side"))

    def generate_query(self, n: Token, *clauses: Clause) -> plan.GenerateQuery:
        return plan.GenerateQuery(n=positive(n, "generate"), **fold(clauses))

    def temperature_clause(self, value: Token) -> Clause:
        return Clause("temperature", float(value), value.start_pos)

    def seed_clause(self, value: Token) -> Clause:
        return Clause("seed", int(value), value.start_pos)

    def at(self, token: Token, key: Token | None = None) -> tuple[int, int | None]:
        return (int(token), int(key) if key is not None else None)

    # --- other queries ---

    def logits_query(self, head: Token, *clauses: Clause) -> plan.LogitsQuery:
        return plan.LogitsQuery(logprobs=head.type == "LOGPROBS", **fold(clauses))

    def k_clause(self, k: Token) -> Clause:
        return Clause("k", positive(k), k.start_pos, "topk")

    def lens_query(self, *clauses: Clause) -> plan.LogitLensQuery:
        return plan.LogitLensQuery(**fold(clauses))

    def ln_f_clause(self, value: Token) -> Clause:
        return Clause("use_ln_f", switch(value, "ln_f setting"), value.start_pos, "ln_f")

    def at_clause(self, location: Token) -> Clause:
        return Clause("at", str(location).lower(), location.start_pos)

    def upvoted_query(self, node: NodeRef, *clauses: Clause) -> plan.UpvotedQuery:
        fields = fold(clauses)
        if "bottom" in fields and "k" in fields:
            second = max(c.pos for c in clauses if c.name in ("k", "bottom"))
            raise NameProblem("give topk or bottomk, not both", second)
        if "bottom" in fields:
            fields["k"] = fields.pop("bottom")
            fields["bottom"] = True
        return plan.UpvotedQuery(node=node, **fields)

    def bottomk_clause(self, k: Token) -> Clause:
        return Clause("bottom", positive(k), k.start_pos, "bottomk")

    @v_args(meta=True)
    def raw_clause(self, meta, children: list) -> Clause:
        return Clause("raw", True, meta.start_pos)

    def routes_query(self, *clauses: Clause) -> plan.RoutesQuery:
        return plan.RoutesQuery(**fold(clauses))

    def metric_query(self, *clauses: Clause) -> plan.MetricQuery:
        return plan.MetricQuery(**fold(clauses))

    def patching_query(self, kind: Token, source: Token, *clauses: Clause) -> plan.PatchingQuery:
        return plan.PatchingQuery(of=choose(kind, tuple(catalog.SWEEPS), "patching component"),
                                  source=choose(source, catalog.SOURCES, "patch source"), **fold(clauses))

    def threshold_clause(self, value: Token) -> Clause:
        threshold = float(value)
        if not 0 <= threshold <= 1:
            raise NameProblem(f"threshold must be between 0 and 1, got {value}", value.start_pos)
        return Clause("threshold", threshold, value.start_pos)

    def renormalize_clause(self, value: Token) -> Clause:
        return Clause("renormalize", switch(value, "renormalize setting"), value.start_pos)

    def from_token_clause(self, token: Token) -> Clause:
        return Clause("from_token", int(token), token.start_pos, "from token")

    def mode_clause(self, mode: Token) -> Clause:
        return Clause("threshold_mode", choose(mode, catalog.ROUTE_MODES, "routes mode"), mode.start_pos, "mode")

    def norm_clause(self, norm: Token) -> Clause:
        if int(norm) not in catalog.ROUTE_NORMS:
            raise NameProblem(f"norm must be 1 or 2, got {norm}", norm.start_pos)
        return Clause("norm", int(norm), norm.start_pos)


def _path(token: Token) -> str:
    return unquote(token) if token.type == "STRING" else str(token)


def _needs_index(node: NodeRef, pos: int) -> None:
    """Ablation and tracing act on one neuron, head or latent (or, for ablation, resid: see bind)."""
    if node.index is None and catalog.NODE_REFS[node.component] == "optional":
        raise NameProblem(f"{node.component} takes a layer and an index: {node.component}[L,I]", pos)


def _node_ref(component: str, layer: int, index: int | None, at: tuple, pos: int) -> NodeRef:
    token, key = at
    if key is not None and component != "attn":
        raise NameProblem(f"only attention takes a key token (@t:u), not {component}", pos)
    return NodeRef(component=component, layer=layer, index=index, token=token, key=key)


def to_plan(tree: Tree) -> object:
    return ToPlan().transform(tree)
