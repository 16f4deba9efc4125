"""Bind a parsed statement to a loaded model: check names and ranges, fill defaults.

    stmt, span = parse("topk 5 act where layer = 9")[0]
    bind(stmt, span, info=loaded.info(), tokenize=loaded.encode, source=text)
    # TdbqlError: 1:19: layer 9 is out of range: the model has 4 layers (0..3)

Everything a statement names is checked here, before any tensor work: layers, heads, neurons and
latents in range; each scalar defined for each component it is asked of; autoencoder components
only where an autoencoder is loaded; targets and distractors single tokens; `where` fields known;
tables named by a `prompts from (subquery)` present. The result is normalised: a node query's
components are filled in (DEFAULT_COMPONENTS plus the loaded autoencoder components, when `of` is
left out) and `sae` is resolved to mlp_sae/attn_sae/resid_sae.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Sequence

from .plan import (
    DEFAULT_COMPONENTS,
    NODE_FIELDS,
    Ablation,
    Condition,
    ExplainStmt,
    LogitLensQuery,
    LogitsQuery,
    Loss,
    NodeQuery,
    NodeRef,
    PromptsFromSql,
    Range,
    RoutesQuery,
    Span,
    Statement,
    TargetStmt,
    Trace,
    UpvotedQuery,
)
from .context import ModelInfo
from .errors import TdbqlError

_LATENTS = ("mlp_sae", "attn_sae", "resid_sae")
_RANKED = ("mlp", "attn", "head") + _LATENTS

# Which components each scalar is defined for (design §3).
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "act": _RANKED,
    "grad": _RANKED,
    "act_times_grad": _RANKED,
    "write_norm": _RANKED,
    "direct_effect": _RANKED,
    "contribution": ("mlp", "attn", "head"),
    "token_attribution": ("embed",),
    "sae_error": _LATENTS,
    "in_edge": _RANKED + ("embed",),
    "attrib_patch": _RANKED,
}
# Parameters each scalar accepts, with their allowed values.
SCALAR_PARAMS: dict[str, dict[str, tuple[object, ...]]] = {"contribution": {"norm": (1, 2)}}

COMPONENT_WORDS: dict[str, str] = {
    "mlp": "MLP neurons",
    "attn": "attention heads",
    "head": "attention heads (summed over keys)",
    "mlp_sae": "MLP autoencoder latents",
    "attn_sae": "attention autoencoder latents",
    "resid_sae": "residual autoencoder latents",
    "embed": "token embeddings",
}
_QUERY_FIELDS: dict[str, tuple[str, ...]] = {
    "logits": ("token", "prompt"),
    "logit_lens": ("layer", "token", "prompt"),
}


def bind(
    stmt: Statement,
    span: Span,
    *,
    info: ModelInfo,
    tokenize: Callable[[str], list[int]],
    tables: Collection[str] = (),
    source: str | None = None,
) -> Statement:
    """Check `stmt` against the model and session; return it normalised. Raises TdbqlError."""
    return _Binder(info, tokenize, tables, span, source).statement(stmt)


class _Binder:
    def __init__(self, info: ModelInfo, tokenize, tables: Collection[str], span: Span, source: str | None):
        self.info, self.tokenize, self.span, self.source = info, tokenize, span, source
        self.tables = {name.lower() for name in tables}
        self.sae_layers: dict[str, dict[int, int]] = {}
        for site, layer, n_latents in info.sae_latents:
            self.sae_layers.setdefault(f"{site}_sae", {})[layer] = n_latents

    # --- errors, placed at the text they are about when the source is known ---

    def fail(self, message: str, near: str | None = None, suggestion: str | None = None) -> TdbqlError:
        pos = self._locate(near) if near else None
        if pos is None:
            line, column = self.span.line, self.span.column
        else:
            line = self.source.count("\n", 0, pos) + 1
            column = pos - (self.source.rfind("\n", 0, pos) + 1) + 1
        return TdbqlError(message, line=line, column=column, source=self.source, suggestion=suggestion)

    def _locate(self, pattern: str) -> int | None:
        if self.source is None:
            return None
        body = self.source[self.span.start_pos : self.span.end_pos]
        match = re.search(pattern, body, flags=re.IGNORECASE | re.DOTALL)
        if match is None:
            return None
        return self.span.start_pos + (match.start("at") if "at" in match.re.groupindex else match.start())

    # --- statements ---

    def statement(self, stmt: Statement) -> Statement:
        if isinstance(stmt, NodeQuery):
            return self.node_query(stmt)
        if isinstance(stmt, LogitsQuery):
            return self.logits_like(stmt, "logits")
        if isinstance(stmt, LogitLensQuery):
            return self.logits_like(stmt, "logit_lens")
        if isinstance(stmt, UpvotedQuery):
            return stmt.model_copy(update={"node": self.node_ref(stmt.node), "k": self.vocab_k(stmt.k)})
        if isinstance(stmt, RoutesQuery):
            if stmt.from_token is not None:
                self.token(stmt.from_token, "token", near=r"\bfrom\b")
            return stmt
        if isinstance(stmt, ExplainStmt):
            return stmt.model_copy(update={"query": self.statement(stmt.query)})
        if isinstance(stmt, TargetStmt):
            return stmt.model_copy(update={"loss": self.loss(stmt.loss)})
        if isinstance(stmt, PromptsFromSql):
            self.check_tables(stmt.sql)
        return stmt

    def node_query(self, query: NodeQuery) -> NodeQuery:
        self.check_params(query)
        trace = self.trace(query.trace) if query.trace else None
        if any(spec.name == "in_edge" for spec in query.scalars) and trace is None:
            raise self.fail("in_edge needs a traced node: add `trace mlp[L,N]@t`", r"\bin_edge\b")
        components = self.components(query)
        scalars = {spec.name for spec in query.scalars}
        allowed = NODE_FIELDS + tuple(spec.name for spec in query.scalars)
        return query.model_copy(
            update={
                "components": components,
                "where": tuple(self.condition(c, allowed, components, scalars) for c in query.where),
                "ablations": tuple(self.ablation(a) for a in query.ablations),
                "trace": trace,
                "target": self.loss(query.target) if query.target else None,
            }
        )

    def logits_like(self, query: LogitsQuery | LogitLensQuery, kind: str):
        allowed = _QUERY_FIELDS[kind]
        return query.model_copy(
            update={
                "k": self.vocab_k(query.k),
                "where": tuple(self.condition(c, allowed, (), set()) for c in query.where),
                "ablations": tuple(self.ablation(a) for a in query.ablations),
            }
        )

    # --- components and scalars ---

    def loaded_sae_components(self) -> tuple[str, ...]:
        return tuple(c for c in _LATENTS if c in self.sae_layers)

    def components(self, query: NodeQuery) -> tuple[str, ...]:
        names = [spec.name for spec in query.scalars]
        if not query.components:
            return self.default_components(names)
        written_as: dict[str, str] = {}  # bound component -> the name the user wrote
        for written in query.components:
            for component in self.expand_component(written):
                written_as.setdefault(component, written)
        for name in names:
            for component, written in written_as.items():
                if component not in APPLIES_TO[name]:
                    raise self.fail(
                        f"{name} is not defined for {component} ({COMPONENT_WORDS[component]}); "
                        f"it applies to {', '.join(APPLIES_TO[name])}",
                        rf"\bof\b.*?(?P<at>\b{written}\b)",
                    )
        return tuple(written_as)

    def default_components(self, names: Sequence[str]) -> tuple[str, ...]:
        loaded = self.loaded_sae_components()
        candidates = DEFAULT_COMPONENTS + loaded
        chosen = tuple(c for c in candidates if all(c in APPLIES_TO[n] for n in names))
        if chosen:
            return chosen
        available = DEFAULT_COMPONENTS + loaded + ("head", "embed")
        chosen = tuple(c for c in available if all(c in APPLIES_TO[n] for n in names))
        if chosen:
            return chosen
        for name in names:
            if not loaded and set(APPLIES_TO[name]) <= set(_LATENTS):
                raise self.fail(f"{name} needs an autoencoder: load one with `sae mlp from 'path'`", rf"\b{name}\b")
        raise self.fail(
            f"the scalars {', '.join(names)} have no component in common; split them into two queries",
            rf"\b{names[0]}\b",
        )

    def expand_component(self, component: str) -> list[str]:
        if component == "sae":
            loaded = self.loaded_sae_components()
            if not loaded:
                raise self.fail("no autoencoder is loaded: load one with `sae mlp from 'path'`", r"\bsae\b")
            return list(loaded)
        if component in _LATENTS and component not in self.sae_layers:
            site = component.removesuffix("_sae")
            raise self.fail(
                f"no autoencoder is loaded at {site}: load one with `sae {site} from 'path'`", rf"\b{component}\b"
            )
        return [component]

    def check_params(self, query: NodeQuery) -> None:
        for spec in query.scalars:
            allowed = SCALAR_PARAMS.get(spec.name, {})
            for key, value in spec.params:
                if key not in allowed:
                    known = f" (it takes {', '.join(allowed)})" if allowed else " (it takes none)"
                    suggestion = _nearest(key, allowed)
                    raise self.fail(f"unknown parameter '{key}' for {spec.name}{known}", rf"\b{key}\b", suggestion)
                if value not in allowed[key]:
                    choices = " or ".join(str(v) for v in allowed[key])
                    raise self.fail(f"{spec.name}({key}={value}): {key} must be {choices}", rf"\b{key}\b")

    # --- where ---

    def condition(self, cond: Condition, allowed: Sequence[str], components: Sequence[str], scalars: set[str]):
        near = rf"\bwhere\b.*?(?P<at>\b{re.escape(cond.field)}\b)"
        if cond.field not in allowed:
            raise self.fail(
                f"unknown field '{cond.field}' (fields: {', '.join(allowed)})", near, _nearest(cond.field, allowed)
            )
        if cond.field in scalars:
            if not isinstance(cond.value, (int, float)) or cond.op == "in":
                raise self.fail(f"{cond.field} is compared with a number, e.g. {cond.field} > 0", near)
            return cond
        if cond.field == "component":
            return self.component_condition(cond, components, near)
        for value in _ints(cond.value):
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
                near, _nearest(cond.value, components),
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
        if component in ("attn", "head"):
            return self.info.n_heads
        if component in _LATENTS:
            return max(self.sae_layers.get(component, {0: 0}).values())
        if component == "embed":
            return 1
        return self.info.d_mlp

    # --- ranges ---

    def in_range(self, value: int, limit: int, what: str, why: str, near: str | None) -> None:
        if not 0 <= value < limit:
            raise self.fail(f"{what} is out of range: {why} (0..{limit - 1})", near)

    def layer(self, layer: int, near: str | None) -> None:
        n = self.info.n_layers
        self.in_range(layer, n, f"layer {layer}", f"the model has {n} layers", near)

    def token(self, token: int, what: str, near: str | None) -> None:
        n_ctx = self.info.n_ctx
        if not -n_ctx <= token < n_ctx:
            raise self.fail(
                f"{what} {token} is out of range: the model reads at most {n_ctx} tokens "
                f"({-n_ctx}..{n_ctx - 1}, negative counts from the end)", near,
            )

    def vocab_k(self, k: int) -> int:
        if k > self.info.vocab_size:
            raise self.fail(f"topk {k} is more than the vocabulary ({self.info.vocab_size} tokens)", r"\btopk\b")
        return k

    # --- node references, ablations, traces ---

    def node_ref(self, node: NodeRef) -> NodeRef:
        near = rf"(\b{node.component}|blocks\.{node.layer}\.)"
        component = node.component
        if component == "sae":
            component = self.resolve_sae(node, near)
        self.layer(node.layer, near)
        if node.index is None:  # resid[L], block[L], or a whole sublayer write mlp[L] / attn[L]
            pass
        elif component == "mlp":
            limit = self.info.d_mlp
            self.in_range(node.index, limit, f"neuron {node.index}", f"MLP layers have {limit} neurons", near)
        elif component == "attn":
            self.in_range(node.index, self.info.n_heads, f"head {node.index}", f"the model has {self.info.n_heads} heads", near)
        elif component in _LATENTS:
            self.latent(component, node, near)
        for token in (node.token, node.key):
            if token is not None:
                self.token(token, "token", near)
        if node.token is not None and node.key is not None and (node.token < 0) == (node.key < 0) and node.key > node.token:
            raise self.fail(f"key token {node.key} comes after query token {node.token}; attention only looks back", near)
        return node if component == node.component else node.model_copy(update={"component": component})

    def resolve_sae(self, node: NodeRef, near: str) -> str:
        loaded = [c for c in self.loaded_sae_components() if node.layer in self.sae_layers[c]]
        if len(loaded) == 1:
            return loaded[0]
        if not loaded:
            raise self.fail(f"no autoencoder is loaded at layer {node.layer}: load one with `sae mlp from 'path'`", near)
        written = " or ".join(f"{c}[{node.layer},{node.index}]" for c in loaded)
        raise self.fail(f"sae[{node.layer},{node.index}] is ambiguous: write {written}", near)

    def latent(self, component: str, node: NodeRef, near: str) -> None:
        site = component.removesuffix("_sae")
        layers = self.sae_layers.get(component, {})
        if node.layer not in layers:
            have = f" (loaded at layers {', '.join(map(str, sorted(layers)))})" if layers else ""
            raise self.fail(f"no {site} autoencoder is loaded at layer {node.layer}{have}", near)
        n = layers[node.layer]
        self.in_range(node.index, n, f"latent {node.index}", f"the {site} autoencoder at layer {node.layer} has {n} latents", near)

    def ablation(self, ablation: Ablation) -> Ablation:
        if ablation.node.component in ("resid", "block"):
            kind = ablation.node.component
            raise self.fail(f"{kind} cannot be ablated: ablate MLP neurons, attention heads or latents", rf"\b{kind}\b")
        return ablation.model_copy(update={"node": self.node_ref(ablation.node)})

    def trace(self, trace: Trace) -> Trace:
        node = trace.node
        if node.component in ("resid", "block"):
            raise self.fail(f"trace takes an MLP neuron, an attention head or a latent, not {node.component}", r"\btrace\b")
        if node.token is None:
            written = f"{node.component}[{node.layer},{node.index}]@t"
            raise self.fail(f"trace needs a token position: write {written}", r"\btrace\b")
        return trace.model_copy(update={"node": self.node_ref(node)})

    # --- losses and SQL ---

    def loss(self, loss: Loss) -> Loss:
        for role, texts in (("target", loss.targets), ("distractor", loss.distractors)):
            for text in texts:
                self.single_token(text, role)
        return loss

    def single_token(self, text: str, role: str) -> None:
        ids = self.tokenize(text)
        if len(ids) != 1:
            count = "empty" if not ids else f"{len(ids)} tokens"
            near = rf"([\"']){re.escape(text)}\1"
            raise self.fail(f"{role} {text!r} is {count}; {role}s must be single tokens", near)

    def check_tables(self, sql: str) -> None:
        ctes = {m.group(1).lower() for m in re.finditer(r"(?:\bwith|,)\s+([A-Za-z_]\w*)\s+as\s*\(", sql, re.IGNORECASE)}
        scrubbed = re.sub(r"'(?:[^']|'')*'", "''", sql)
        for match in re.finditer(r"\b(?:from|join)\s+([A-Za-z_][\w.]*)(\s*\()?", scrubbed, re.IGNORECASE):
            if match.group(2):  # a table function such as read_parquet(...)
                continue
            name = match.group(1).split(".")[-1].lower()
            if name not in self.tables and name not in ctes:
                known = sorted(self.tables)
                listed = f" (tables: {', '.join(known)})" if known and len(known) <= 12 else ""
                raise self.fail(
                    f"unknown table '{match.group(1)}'{listed}", rf"\b{re.escape(match.group(1))}\b",
                    _nearest(name, known),
                )


def _ints(value: object) -> tuple[object, ...]:
    if isinstance(value, Range):
        return (value.lo, value.hi)
    if isinstance(value, tuple):
        return value
    return (value,)


def _nearest(word: str, choices: Collection[str]) -> str | None:
    found = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return found[0] if found else None
