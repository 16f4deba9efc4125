"""Bind a parsed statement to a loaded model: the one place that checks names and ranges.

    stmt, span = parse("topk 5 act where layer = 9")[0]
    bind(stmt, span, info=loaded.info(), tokenize=loaded.encode, source=text)
    # TdbqlError: 1:19: layer 9 is out of range: the model has 4 layers (0..3)

Everything a statement names is checked here, before any tensor work: layers, heads, neurons and
latents in range; each scalar defined for each component it is asked of (catalog.py); its
parameters; autoencoder components only where an autoencoder is loaded; traces, ablations and
`upvoted` nodes well-formed; targets and distractors single tokens; `where` fields known;
settings and their values; tables named by a `prompts from (subquery)` present. The result is
normalised: a node query's components are the components whose rows it computes (the defaults
when `of` is left out, `sae` expanded, error rows added for `sae_error`), parameters carry their
defaults, `sae[L,I]` names its site.

`bind_query` then resolves a model query's loss against the session (the query's own target, or
the session's) and returns the `BoundQuery` the engine runs; the engine does not check again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence

from . import catalog
from .catalog import COMPONENTS, LATENTS, SCALARS
from .bind_steer import SteerChecks, uses_corrupt_means
from .checks import Checks, ValueChecks, int_values
from .context import ModelInfo
from .errors import LOSS_HINT, nearest
from .plan import (
    BoundQuery,
    Condition,
    ExplainStmt,
    LogitLensQuery,
    LogitsQuery,
    Loss,
    MetricQuery,
    ModelStmt,
    NodeQuery,
    PatchingQuery,
    PromptsFromSql,
    Query,
    RoutesQuery,
    ScalarSpec,
    SetStmt,
    Span,
    SqlStmt,
    Statement,
    TargetStmt,
    UpvotedQuery,
)

MODEL_FREE = (ModelStmt, SetStmt, SqlStmt)  # statements that bind without a loaded model


def needs_model(stmt: Statement) -> bool:
    """Whether binding `stmt` needs the loaded model's shape (so the model must be loaded first)."""
    return not isinstance(stmt, MODEL_FREE)


def bind(
    stmt: Statement,
    span: Span | None,
    *,
    info: ModelInfo | None = None,
    tokenize: Callable[[str], list[int]] | None = None,
    tables: Collection[str] = (),
    source: str | None = None,
    dtype: str = "fp32",
) -> Statement:
    """Check `stmt` against the model and session; return it normalised. Raises TdbqlError.
    `info` and `tokenize` may be None only for statements that do not `needs_model`; `dtype` is
    the model's, whose finite range bounds ablation values and scalar comparisons."""
    binder = _Binder(info, tokenize, tables, span, source)
    binder.dtype = dtype
    binder.text_values(stmt)
    return binder.numbers(binder.statement(stmt))


def bind_query(
    query: Query,
    span: Span | None,
    *,
    session_loss: Loss | None,
    prompts_have_targets: bool,
    prompts_have_pairs: bool = False,
    source: str | None = None,
    explain: bool = False,
) -> BoundQuery:
    """A bound model query with its loss resolved, checked against the session's prompt set: an
    error when a gradient or a metric needs a loss and there is none (no query target, no session
    target, and not every prompt carries its own), or a patch needs prompt pairs and there are
    none."""
    binder = _Binder(None, None, (), span, source)
    patch = getattr(query, "patch", None)
    if uses_corrupt_means(query) and not prompts_have_pairs:
        raise binder.fail("mean(corrupt) averages the corrupted prompts: give each prompt its corrupted version, "
                          "`prompt \"...\" corrupt \"...\"`", r"\bmean\s*\(\s*corrupt")
    if (patch is not None or isinstance(query, PatchingQuery)) and not prompts_have_pairs:
        word = r"\bpatching\b" if isinstance(query, PatchingQuery) else r"\bpatch\b"
        raise binder.fail("patching needs prompt pairs: give each prompt its corrupted version, "
                          "`prompt \"...\" corrupt \"...\"` (or a `corrupt` column in the prompts file)", word)
    loss = getattr(query, "target", None) or session_loss
    if loss is None and not prompts_have_targets:
        binder.needs_loss(query)
    return BoundQuery(query=query, loss=loss, explain=explain)


class _Binder(Checks, SteerChecks, ValueChecks):
    def needs_loss(self, query: Query) -> None:
        """The error for a query that reads the loss when the session has none."""
        if isinstance(query, (MetricQuery, PatchingQuery)):
            raise self.fail(f"{query.kind} measures the target: {LOSS_HINT}", rf"\b{query.kind}\b")
        if not isinstance(query, NodeQuery):
            return
        needing = [s.name for s in query.scalars if SCALARS[s.name].gradient]
        trace = query.trace
        if needing and trace is not None and trace.via == "v":
            node = trace.node
            raise self.fail(f"trace attn[{node.layer},{node.index}] via v weighs the head's write by the loss "
                            f"gradient: {LOSS_HINT}", r"\btrace\b")
        if needing and trace is None:
            raise self.fail(f"{', '.join(needing)} needs a loss: {LOSS_HINT}", rf"\b{needing[0]}\b")
        if query.verify:
            raise self.fail(f"verify measures the effect on the target: {LOSS_HINT}", r"\bverify\b")

    # --- statements ---

    def statement(self, stmt: Statement) -> Statement:
        visit = getattr(self, f"visit_{type(stmt).__name__}", None)
        return stmt if visit is None else visit(stmt)

    def visit_NodeQuery(self, query: NodeQuery) -> NodeQuery:
        scalars = self.scalars(query.scalars)
        names = tuple(spec.name for spec in scalars)
        trace = self.trace(query.trace) if query.trace else None
        for name in names:
            if SCALARS[name].needs_trace and trace is None:
                raise self.fail(f"{name} needs a traced node: add `trace mlp[L,N]@t`", rf"\b{name}\b")
        if query.over_prompts and "prompt" in query.by:
            raise self.fail("`by prompt` cannot be combined with `over prompts`", r"\bby\b")
        if query.verify:
            self.check_verify(query)
        components = catalog.row_components(names, self.components(query, names))
        return query.model_copy(
            update={
                "scalars": scalars,
                "components": components,
                "where": tuple(self.condition(c, catalog.NODE_FIELDS + names, components, names) for c in query.where),
                "ablations": tuple(self.ablation(a) for a in query.ablations),
                "trace": trace,
                "target": self.loss(query.target) if query.target else None,
                "patch": self.patch(query.patch),
                "steers": self.steers(query.steers),
            }
        )

    def check_verify(self, query: NodeQuery) -> None:
        """`verify` re-measures each ranked row on the target: a ranking on the target is needed."""
        near = r"\bverify\b"
        if query.mode == "select":
            raise self.fail("verify checks a ranking: use topk or bottomk (select ranks nothing)", near)
        if query.trace is not None:
            raise self.fail("verify measures the effect on the target; a traced query ranks by the traced node", near)
        if query.over_prompts:
            raise self.fail("verify runs per prompt: leave out `over prompts` (or group with `by prompt`)", near)
        if query.patch is not None:
            raise self.fail("verify runs the clean prompts (or, for attrib_patch, the pairs): leave out `patch`", near)

    def visit_MetricQuery(self, query: MetricQuery) -> MetricQuery:
        self.group_keys(query.by, "metric")
        if query.over_prompts and "prompt" in query.by:
            raise self.fail("`by prompt` cannot be combined with `over prompts`", r"\bby\b")
        return query.model_copy(update={
            "ablations": tuple(self.ablation(a) for a in query.ablations),
            "patch": self.patch(query.patch),
            "steers": self.steers(query.steers),
            "target": self.loss(query.target) if query.target else None,
        })

    def visit_PatchingQuery(self, query: PatchingQuery) -> PatchingQuery:
        self.group_keys(query.by, "patching")
        if query.over_prompts and "prompt" in query.by:
            raise self.fail("`by prompt` cannot be combined with `over prompts`", r"\bby\b")
        if query.of == "latent" and not self.loaded_latents():
            raise self.fail("patching of latent needs an autoencoder: load one with `sae mlp from 'path'`",
                            r"\blatent\b")
        unit = catalog.SWEEPS[query.of].unit
        components = {"head": ("head",), "neuron": ("mlp",), "latent": self.loaded_latents()}.get(unit, ())
        return query.model_copy(update={
            "where": tuple(self.condition(c, catalog.QUERY_FIELDS["patching"], components, ()) for c in query.where),
            "ablations": tuple(self.ablation(a) for a in query.ablations),
            "steers": self.steers(query.steers),
            "target": self.loss(query.target) if query.target else None,
        })

    def group_keys(self, by: Sequence[str], kind: str) -> None:
        allowed = catalog.QUERY_GROUP_KEYS[kind]
        for key in by:
            if key not in allowed:
                shown = ", ".join("position" if k == "token" else k for k in allowed)
                raise self.fail(f"{kind} groups by {shown}, not {key}", r"\bby\b")

    def visit_LogitsQuery(self, query: LogitsQuery) -> LogitsQuery:
        return self.logits_like(query, "logits")

    def visit_LogitLensQuery(self, query: LogitLensQuery) -> LogitLensQuery:
        return self.logits_like(query, "logit_lens")

    def visit_UpvotedQuery(self, query: UpvotedQuery) -> UpvotedQuery:
        node = self.node_ref(query.node)
        near = rf"\b{re.escape(query.node.component)}\b"
        if node.component in catalog.RESIDUALS:
            raise self.fail("upvoted takes mlp[L,N], attn[L,H], sae[L,I] or a whole block (mlp[L], attn[L], "
                            "block[L]); use logit_lens for resid[L]", near)
        if node.key is not None and node.token is None:
            raise self.fail("a key token (@t:u) needs a query token: attn[L,H]@t:u", near)
        if query.raw and (node.index is None or node.component == "block"):
            raise self.fail("raw needs a single neuron, latent or head, not a whole block", r"\braw\b")
        if query.raw and node.component == "attn" and node.key is None:
            raise self.fail("raw for a head needs a key (attn[L,H]@t:u): its raw write is v[u] W_O[h]", r"\braw\b")
        return query.model_copy(update={"node": node, "k": self.vocab_k(query.k)})

    def visit_RoutesQuery(self, query: RoutesQuery) -> RoutesQuery:
        if not 0 <= query.threshold < 1:
            raise self.fail(f"routes threshold must be in [0, 1), not {query.threshold}", r"\bthreshold\b")
        if query.from_token is not None:
            self.token(query.from_token, "token", near=r"\bfrom\s+token\b")
        return query.model_copy(update={"ablations": tuple(self.ablation(a) for a in query.ablations),
                                         "patch": self.patch(query.patch), "steers": self.steers(query.steers)})

    def visit_ExplainStmt(self, stmt: ExplainStmt) -> ExplainStmt:
        return stmt.model_copy(update={"query": self.statement(stmt.query)})

    def visit_TargetStmt(self, stmt: TargetStmt) -> TargetStmt:
        return stmt.model_copy(update={"loss": self.loss(stmt.loss)})

    def visit_PromptsFromSql(self, stmt: PromptsFromSql) -> PromptsFromSql:
        self.check_tables(stmt.sql)
        return stmt

    def visit_SetStmt(self, stmt: SetStmt) -> SetStmt:
        name = stmt.name.lower()
        setting = catalog.SETTINGS.get(name)
        if setting is None:
            raise self.fail(f"unknown setting '{stmt.name}' (settings: {', '.join(catalog.SETTINGS)})",
                            rf"\b{re.escape(stmt.name)}\b", nearest(name, catalog.SETTINGS))
        return stmt.model_copy(update={"name": name, "value": self.setting_value(setting, stmt.value)})

    def logits_like(self, query: LogitsQuery | LogitLensQuery, kind: str):
        fields = catalog.QUERY_FIELDS[kind]
        return query.model_copy(
            update={
                "k": self.vocab_k(query.k),
                "where": tuple(self.condition(c, fields, (), ()) for c in query.where),
                "ablations": tuple(self.ablation(a) for a in query.ablations),
                "patch": self.patch(query.patch),
                "steers": self.steers(query.steers),
            }
        )

    # --- settings ---

    def setting_value(self, setting: catalog.SettingDef, value):
        near = rf"\b{setting.name}\b"
        if setting.kind == "switch":
            on = catalog.switch_value(value)
            if on is None:
                raise self.fail(f"{setting.name} is on or off, not {value!r}", near)
            return on
        if setting.kind == "count":
            if isinstance(value, str) and value.lower() == "auto":
                return "auto"
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise self.fail(f"{setting.name} must be a positive integer or 'auto', not {value!r}", near)
            return value
        if setting.kind == "choice" and str(value) not in setting.choices:
            raise self.fail(f"{setting.name} must be one of {', '.join(setting.choices)}, not {value!r}", near,
                            nearest(str(value), setting.choices))
        return str(value)

    # --- scalars and components ---

    def scalars(self, specs: Sequence[ScalarSpec]) -> tuple[ScalarSpec, ...]:
        seen: set[str] = set()
        out = []
        for spec in specs:
            if spec.name in seen:
                raise self.fail(f"{spec.name} is asked twice: each scalar is one column", rf"\b{spec.name}\b")
            seen.add(spec.name)
            out.append(self.scalar_params(spec))
        return tuple(out)

    def scalar_params(self, spec: ScalarSpec) -> ScalarSpec:
        scalar = SCALARS[spec.name]
        allowed = [p.name for p in scalar.params]
        given = dict(spec.params)
        for key, value in spec.params:
            param = scalar.param(key)
            if param is None:
                known = f" (it takes {', '.join(allowed)})" if allowed else " (it takes none)"
                raise self.fail(f"unknown parameter '{key}' for {spec.name}{known}", rf"\b{key}\b",
                                nearest(key, allowed))
            if value not in param.choices or isinstance(value, bool):
                choices = " or ".join(str(v) for v in param.choices)
                raise self.fail(f"{spec.name}({key}={value}): {key} must be {choices}", rf"\b{key}\b")
        params = tuple((p.name, given.get(p.name, p.default)) for p in scalar.params)
        return spec.model_copy(update={"params": params})

    def components(self, query: NodeQuery, names: Sequence[str]) -> tuple[str, ...]:
        if not query.components:
            return self.default_components(names)
        written_as: dict[str, str] = {}  # component -> the name the user wrote
        for written in query.components:
            for component in self.expand_component(written):
                written_as.setdefault(component, written)
        for name in names:
            for component, written in written_as.items():
                if not catalog.applies(name, component):
                    raise self.fail(
                        f"{name} is not defined for {component} ({COMPONENTS[component].words}); "
                        f"it applies to {', '.join(SCALARS[name].applies_to)}",
                        rf"\bof\b.*?(?P<at>\b{written}\b)",
                    )
        return tuple(written_as)

    def default_components(self, names: Sequence[str]) -> tuple[str, ...]:
        """mlp, attn and the loaded latents where every scalar applies; failing that, the
        components where they all do (token_attribution: embed)."""
        loaded = self.loaded_latents()
        errors = tuple(COMPONENTS[c].error for c in loaded)
        for candidates in (catalog.DEFAULT_COMPONENTS + loaded,
                           catalog.DEFAULT_COMPONENTS + loaded + ("head", "embed") + errors):
            chosen = tuple(c for c in candidates if all(catalog.applies(n, c) for n in names))
            if chosen:
                return chosen
        for name in names:
            if not loaded and set(SCALARS[name].applies_to) <= set(LATENTS + catalog.SAE_ERRORS):
                raise self.fail(f"{name} needs an autoencoder: load one with `sae mlp from 'path'`", rf"\b{name}\b")
        raise self.fail(
            f"the scalars {', '.join(names)} have no component in common; split them into two queries",
            rf"\b{names[0]}\b",
        )

    def expand_component(self, component: str) -> list[str]:
        if component == catalog.SAE_WORD:
            loaded = self.loaded_latents()
            if not loaded:
                raise self.fail("no autoencoder is loaded: load one with `sae mlp from 'path'`", r"\bsae\b")
            return list(loaded)
        site = COMPONENTS[component].site
        if site is not None and catalog.latent_component(site) not in self.sae_layers:
            raise self.fail(
                f"no autoencoder is loaded at {site}: load one with `sae {site} from 'path'`", rf"\b{component}\b"
            )
        return [component]

    # --- where ---

    def condition(self, cond: Condition, allowed: Sequence[str], components: Sequence[str],
                  scalars: Sequence[str]) -> Condition:
        near = rf"\bwhere\b.*?(?P<at>\b{re.escape(cond.field)}\b)"
        if cond.field not in allowed:
            raise self.fail(
                f"unknown field '{cond.field}' (fields: {', '.join(allowed)})", near, nearest(cond.field, allowed)
            )
        if cond.field in scalars:
            if not isinstance(cond.value, (int, float)) or isinstance(cond.value, bool) or cond.op == "in":
                raise self.fail(f"{cond.field} is compared with a number, e.g. {cond.field} > 0", near)
            return cond
        if cond.field == "component":
            return self.component_condition(cond, components, near)
        for value in int_values(cond.value):
            if not isinstance(value, int) or isinstance(value, bool):
                raise self.fail(f"{cond.field} takes integers, got {value!r}", near)
            self.field_value(cond.field, value, components, near)
        return cond

    def component_condition(self, cond: Condition, components: Sequence[str], near: str) -> Condition:
        if cond.op not in ("=", "!=") or not isinstance(cond.value, str):
            raise self.fail("component is compared with = or != and a name, e.g. component = mlp", near)
        if cond.value not in components:
            raise self.fail(
                f"component '{cond.value}' is not in this query (components: {', '.join(components)})",
                near, nearest(cond.value, components),
            )
        return cond

    def field_value(self, field: str, value: int, components: Sequence[str], near: str) -> None:
        if field == "layer":
            self.layer(value, near)
        elif field == "head":
            self.in_range(value, self.info.n_heads, f"head {value}", f"the model has {self.info.n_heads} heads", near)
        elif field in ("token", "attended"):
            self.token(value, field, near)
        elif field == "prompt" and value < 0:
            raise self.fail(f"prompt ids count from 0, got {value}", near)
        elif field == "unit":
            limit = max((self.unit_count(c) for c in components), default=self.info.d_mlp)
            self.in_range(value, limit, f"unit {value}", f"the largest component here has {limit} units", near)

    def unit_count(self, component: str) -> int:
        unit = COMPONENTS[component].unit
        if unit == "head":
            return self.info.n_heads
        if unit == "latent":
            return max(self.sae_layers.get(component, {0: 0}).values())
        if unit == "neuron":
            return self.info.d_mlp
        return 1
