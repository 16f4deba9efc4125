"""Completion for the REPL: a pure function from (text, cursor, names) to candidate words.

The LALR parser says what may come next: `parse_interactive` on the statement up to the partial
word, then `accepts()`. Keyword terminals become literal completions; NAME becomes scalar,
component, field, ... names according to the clause the cursor is in (`name_role`). SQL
statements complete table names after FROM/JOIN and column or table names elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from lark.exceptions import LarkError

from ..grammar.parse import LITERALS, name_role, parser, tokens_before
from ..grammar.split import DSL_QUERY_STARTS, DSL_STATEMENT_STARTS, SQL_KEYWORDS, split_statements
from ..query import catalog
from ..query.catalog import SCALAR_NAMES
from ..query.errors import TdbqlError

_PARTIAL = re.compile(r"[A-Za-z0-9_]*$")
_SQL_TABLE_CONTEXT = frozenset({"from", "join", "into", "table", "update", "describe", "summarize"})
SQL_WORDS: tuple[str, ...] = (
    "select", "from", "where", "group", "by", "order", "limit", "join", "on", "as", "and", "or",
    "not", "having", "distinct", "count", "sum", "avg", "min", "max", "desc", "asc", "with",
)
# Clause keywords may appear once per query (a second one is an error), except these.
_REPEATABLE = frozenset({"and", "vs", "in", "between", "mean", "token", "prompts"})


def complete(
    text: str,
    cursor: int,
    *,
    scalars: Sequence[str] = SCALAR_NAMES,
    tables: Iterable[str] = (),
    columns: Iterable[str] = (),
    components: Sequence[str] = catalog.WRITTEN_COMPONENTS,
) -> list[str]:
    """Words that may replace the partial word before `cursor` (names first, then keywords)."""
    before = text[:cursor]
    partial = _PARTIAL.search(before).group(0)
    if partial[:1].isdigit():
        return []
    word_start = cursor - len(partial)
    try:
        chunk = split_statements(before[:word_start] + "x")[-1]
    except TdbqlError:
        return []  # inside an unterminated string
    prefix = before[chunk.start : word_start]
    tables, columns = list(tables), list(columns)
    opening = prefix.strip().lower()
    if chunk.start == word_start:
        candidates = sorted(DSL_STATEMENT_STARTS) + sorted(SQL_KEYWORDS - DSL_STATEMENT_STARTS)
    elif opening == "explain":  # tdbql's explain or DuckDB's, decided by the next word
        candidates = sorted(DSL_QUERY_STARTS) + ["analyze", "with"]
    elif opening in ("select", "explain select"):  # a node query or SQL, decided by this word
        candidates = list(scalars) + columns + list(SQL_WORDS)
    elif chunk.is_sql:
        candidates = _sql_candidates(prefix, tables, columns)
    elif (subquery := _open_subquery(prefix)) is not None:
        candidates = _sql_candidates(subquery, tables, columns)
    else:
        candidates = _dsl_candidates(prefix, scalars, components)
    return _matching(candidates, partial)


def _matching(candidates: Iterable[str], partial: str) -> list[str]:
    lowered = partial.lower()
    return list(dict.fromkeys(c for c in candidates if c.lower().startswith(lowered) and c.lower() != lowered))


def _open_subquery(prefix: str) -> str | None:
    """The SQL typed so far inside `prompts from (` when its parenthesis is still open."""
    match = re.match(r"\s*prompts\s+from\s*\(", prefix, re.IGNORECASE)
    if match is None:
        return None
    inner = prefix[match.end() :]
    return inner if inner.count("(") >= inner.count(")") else None


def _dsl_candidates(prefix: str, scalars: Sequence[str], components: Sequence[str]) -> list[str]:
    try:
        interactive = parser().parse_interactive(prefix)
        interactive.exhaust_lexer()
        accepts = interactive.accepts()
    except LarkError:
        return []
    tokens = tokens_before(prefix)
    names: list[str] = []
    if "NAME" in accepts:
        names = _names_for(name_role(tokens), tokens, scalars, components)
    if "LOCATION" in accepts:
        names += catalog.RESIDUAL_LOCATIONS
    used = {str(t).lower() for t in tokens[1:] if t.type in LITERALS}
    keywords = sorted(
        LITERALS[t].lower()
        for t in accepts
        if t in LITERALS and LITERALS[t][0].isalpha() and LITERALS[t].lower() not in used - _REPEATABLE
    )
    return names + keywords


def _names_for(role: str | None, tokens: Sequence, scalars: Sequence[str], components: Sequence[str]) -> list[str]:
    head = str(tokens[0]).lower() if tokens else ""
    if head == "explain" and len(tokens) > 1:
        head = str(tokens[1]).lower()
    if role == "field":
        if head in ("logits", "logprobs"):
            return list(catalog.QUERY_FIELDS["logits"])
        if head in ("logit_lens", "patching"):
            return list(catalog.QUERY_FIELDS[head])
        return list(catalog.NODE_FIELDS) + list(scalars)
    if role == "value":
        field = _last_field(tokens)
        return list(components) if field == "component" else []
    fixed = {
        "scalar": scalars,
        "component": components,
        "group key": catalog.GROUP_KEYS,
        "node kind": tuple(k for k in catalog.NODE_REFS if "." not in k),  # resid.pre & co. lex as LOCATION
        "trace path": catalog.TRACE_PATHS,
        "reduction": catalog.REDUCTIONS,
        "site": catalog.SAE_SITES,
        "dtype": catalog.DTYPES,
        "switch": ("on", "off"),
        "mode": catalog.ROUTE_MODES,
        "parameter": tuple(dict.fromkeys(p.name for s in catalog.SCALARS.values() for p in s.params)),
        "setting": tuple(catalog.SETTINGS),
        "patch source": catalog.SOURCES,
        "sweep": tuple(s for s in catalog.SWEEPS if "." not in s),  # resid.pre & co. lex as LOCATION
    }
    return list(fixed.get(role or "", ()))


def _last_field(tokens: Sequence) -> str | None:
    names = [str(t).lower() for t in tokens if t.type == "NAME"]
    return names[-1] if names else None


def _sql_candidates(prefix: str, tables: list[str], columns: list[str]) -> list[str]:
    words = re.findall(r"[A-Za-z_]\w*|[,(]", prefix)
    previous = words[-1].lower() if words else ""
    if previous in _SQL_TABLE_CONTEXT:
        return tables
    return columns + tables + list(SQL_WORDS)
