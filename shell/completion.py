"""Completion for the REPL: a pure function from (text, cursor, names) to candidate words.

The LALR parser says what may come next: `parse_interactive` on the statement up to the partial
word, then `accepts()`. Keyword terminals become literal completions; NAME becomes what the binder
accepts in that place (`name_role`): after `where` the query kind's fields and the query's own
scalars, after `ablate` the nodes that can be ablated, and so on. SQL completes table names after
FROM/JOIN and, elsewhere, the columns of the tables the statement names. A meta-command line
completes command names, then each command's arguments (tables, files, choices, `.plot` options).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from lark.exceptions import LarkError

from ..grammar.parse import LITERALS, name_role, parser, tokens_before
from ..grammar.split import (
    DSL_QUERY_STARTS,
    DSL_STATEMENT_STARTS,
    SQL_KEYWORDS,
    split_statements,
)
from ..query import catalog
from ..query.bind_steer import STEER_SITES
from ..query.catalog import SCALAR_NAMES
from ..query.errors import TdbqlError
from .plot import PLOT_KINDS
from .registry import is_meta
from .text import offset_of

_PARTIAL = re.compile(r"[A-Za-z0-9_]*$")
_META_PARTIAL = re.compile(r"\S*$")
_SQL_TABLE_CONTEXT = frozenset({"from", "join", "into", "table", "update", "describe", "summarize"})
SQL_WORDS: tuple[str, ...] = (
    "select", "from", "where", "group", "by", "order", "limit", "join", "on", "as", "and", "or",
    "not", "having", "distinct", "count", "sum", "avg", "min", "max", "desc", "asc", "with",
)
# Clause keywords may appear once per query (a second one is an error), except these.
_REPEATABLE = frozenset({"and", "vs", "in", "between", "mean", "token", "prompts"})
_QUERY_HEADS = frozenset({"topk", "bottomk", "select"})
# the node kinds each clause takes (query/checks.py, query/bind.py, query/bind_steer.py); LOCATION: resid.pre & co.
_ABLATABLE = tuple(k for k, index in catalog.NODE_REFS.items() if index != "none")
_NODE_KINDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "ablate": (_ABLATABLE, False),
    "trace": (_ABLATABLE, False),
    "upvoted": (tuple(k for k in catalog.NODE_REFS if "." not in k and k not in catalog.RESIDUALS), False),
    "patch": (tuple(k for k in catalog.NODE_REFS if "." not in k and k != "block"), True),
    "steer": (tuple(k for k in STEER_SITES if "." not in k), True),
}
_PLOT_OPTIONS = ("--kind", "--value", "--to")
FileLister = Callable[[str], Iterable[str]]


def word_before(text: str, cursor: int) -> str:
    """The partial word before `cursor` that a candidate replaces (on a meta-command line: the
    whole word, so that file paths complete)."""
    before = text[:cursor]
    pattern = _META_PARTIAL if _meta_line(before) is not None else _PARTIAL
    return pattern.search(before).group(0)


def complete(
    text: str,
    cursor: int,
    *,
    scalars: Sequence[str] = SCALAR_NAMES,
    tables: Iterable[str] | None = None,
    columns: Iterable[str] | None = None,
    components: Sequence[str] = catalog.WRITTEN_COMPONENTS,
    table_columns: Mapping[str, Sequence[str]] | None = None,
    meta: Mapping[str, object] | None = None,
    files: FileLister | None = None,
) -> list[str]:
    """Words that may replace `word_before(text, cursor)` (names first, then keywords).

    `table_columns` maps each table to its columns; `tables` and `columns` default to its keys
    and all its columns. `meta` is the meta-command registry (objects with `.arguments`), `files`
    lists paths starting with a prefix."""
    table_columns = dict(table_columns or {})
    tables = list(tables) if tables is not None else sorted(table_columns)
    columns = list(columns) if columns is not None else list(dict.fromkeys(c for cs in table_columns.values() for c in cs))
    before = text[:cursor]
    line = _meta_line(before)
    if line is not None:
        partial = _META_PARTIAL.search(before).group(0)
        return _matching(_meta_candidates(line, partial, meta or {}, tables, table_columns, files), partial)
    partial = _PARTIAL.search(before).group(0)
    if partial[:1].isdigit():
        return []
    word_start = cursor - len(partial)
    try:
        chunk = split_statements(before[:word_start] + "x")[-1]
    except TdbqlError:
        return []  # inside an unterminated string
    prefix = before[chunk.start : word_start]
    opening = prefix.strip().lower()
    statement = prefix + _rest_of_statement(text, cursor)
    if chunk.start == word_start:
        candidates = sorted(DSL_STATEMENT_STARTS) + sorted(SQL_KEYWORDS - DSL_STATEMENT_STARTS) + ["help"]
    elif opening == "explain":  # tdbql's explain or DuckDB's, decided by the next word
        candidates = sorted(DSL_QUERY_STARTS) + ["analyze", "with"]
    elif opening in ("select", "explain select") and not _known_tables(statement, table_columns):
        candidates = list(scalars) + columns + list(SQL_WORDS)  # a node query or SQL, decided by this word
    elif chunk.is_sql or opening in ("select", "explain select"):
        candidates = _sql_candidates(prefix, statement, tables, columns, table_columns)
    elif (subquery := _open_subquery(prefix)) is not None:
        candidates = _sql_candidates(subquery, subquery, tables, columns, table_columns)
    else:
        candidates = _dsl_candidates(prefix, scalars, components)
    return _matching(candidates, partial)


def _matching(candidates: Iterable[str], partial: str) -> list[str]:
    lowered = partial.lower()
    return list(dict.fromkeys(c for c in candidates if c.lower().startswith(lowered) and c.lower() != lowered))


def _rest_of_statement(text: str, cursor: int) -> str:
    end = text.find(";", cursor)
    return text[cursor:] if end < 0 else text[cursor:end]


def _open_subquery(prefix: str) -> str | None:
    """The SQL typed so far inside `prompts from (` when its parenthesis is still open."""
    match = re.match(r"\s*prompts\s+from\s*\(", prefix, re.IGNORECASE)
    if match is None:
        return None
    inner = prefix[match.end() :]
    return inner if inner.count("(") >= inner.count(")") else None


# --- tdbql -------------------------------------------------------------------------------------------


def _dsl_candidates(prefix: str, scalars: Sequence[str], components: Sequence[str]) -> list[str]:
    try:
        interactive = parser().parse_interactive(prefix)
        interactive.exhaust_lexer()
        accepts = interactive.accepts()
    except LarkError:
        return []
    tokens = tokens_before(prefix)
    names: list[str] = []
    locations = "LOCATION" in accepts
    if "NAME" in accepts:
        role = name_role(tokens)
        names = _names_for(role, tokens, scalars, components)
        if role == "node kind":
            kinds, locations = _NODE_KINDS.get(_last_keyword(tokens, _NODE_KINDS), (names, locations))
            names = [n for n in names if n in kinds]
    if locations:
        names += catalog.RESIDUAL_LOCATIONS
    used = {str(t).lower() for t in tokens[1:] if t.type in LITERALS}
    keywords = sorted(
        LITERALS[t].lower()
        for t in accepts
        if t in LITERALS and LITERALS[t][0].isalpha() and LITERALS[t].lower() not in used - _REPEATABLE
    )
    return names + keywords


def _last_keyword(tokens: Sequence, words: Iterable[str]) -> str | None:
    wanted = set(words)
    for token in reversed(tokens):
        if token.type in LITERALS and str(token).lower() in wanted:
            return str(token).lower()
    return None


def _query_head(tokens: Sequence) -> str:
    head = str(tokens[0]).lower() if tokens else ""
    if head == "explain" and len(tokens) > 1:
        head = str(tokens[1]).lower()
    return head


def _query_scalars(tokens: Sequence) -> list[str]:
    """The scalars a node query names (`topk 5 act, grad(...)`): the binder's `where` takes these."""
    start = next((i for i, t in enumerate(tokens) if str(t).lower() in _QUERY_HEADS), None)
    if start is None:
        return []
    names, depth = [], 0
    for token in tokens[start + 1 :]:
        word = str(token)
        if word in ("(", ")"):
            depth += 1 if word == "(" else -1
        elif token.type == "NAME" and depth == 0:
            names.append(word.lower())
        elif token.type in LITERALS and word not in (",", "=") and depth == 0:
            break
    return names


def _names_for(role: str | None, tokens: Sequence, scalars: Sequence[str], components: Sequence[str]) -> list[str]:
    head = _query_head(tokens)
    if role == "field":
        if head in ("logits", "logprobs"):
            return list(catalog.QUERY_FIELDS["logits"])
        if head in catalog.QUERY_FIELDS:
            return list(catalog.QUERY_FIELDS[head])
        own = [s for s in _query_scalars(tokens) if s in scalars]
        return list(catalog.NODE_FIELDS) + list(dict.fromkeys(own))
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


# --- SQL ---------------------------------------------------------------------------------------------


def _sql_candidates(prefix: str, statement: str, tables: list[str], columns: list[str],
                    table_columns: Mapping[str, Sequence[str]]) -> list[str]:
    words = re.findall(r"[A-Za-z_]\w*|[,(]", prefix)
    previous = words[-1].lower() if words else ""
    if previous in _SQL_TABLE_CONTEXT:
        return tables
    named = _known_tables(statement, table_columns)
    own = list(dict.fromkeys(c for t in named for c in table_columns[t])) if named else columns
    return own + tables + list(SQL_WORDS)


def _known_tables(statement: str, table_columns: Mapping[str, Sequence[str]]) -> list[str]:
    """The tables a SQL statement reads (the words after FROM, JOIN, UPDATE, ...) whose columns are known."""
    found = re.findall(r"\b(?:from|join|update|describe|summarize)\s+(\"[^\"]+\"|[A-Za-z_]\w*)", statement,
                       re.IGNORECASE)
    return [t for t in dict.fromkeys(name.strip('"') for name in found) if t in table_columns]


# --- meta-commands -----------------------------------------------------------------------------------


def _meta_line(before: str) -> str | None:
    """The meta-command line the cursor is on, if it is one (first on its line, not inside SQL)."""
    line_start = before.rfind("\n") + 1
    line = before[line_start:]
    if not is_meta(line):
        return None
    try:
        chunks = split_statements(before)
    except TdbqlError as err:  # an open quote: on this line (`.read 'my fi`), or a string from above
        opened = offset_of(before, err.line or 1, err.column or 1)
        return line.lstrip() if opened >= line_start else None
    start = line_start + len(line) - len(line.lstrip())
    return line.lstrip() if chunks and chunks[-1].start == start else None


def _meta_candidates(line: str, partial: str, meta: Mapping[str, object], tables: list[str],
                     table_columns: Mapping[str, Sequence[str]], files: FileLister | None) -> list[str]:
    words = line.split()
    if len(words) <= 1 and not line[-1:].isspace():
        return sorted(meta, key=lambda name: (name[0] != ".", name))
    command = meta.get(words[0].lower())
    if command is None:
        return []
    done = words[1:] if line[-1:].isspace() else words[1:-1]
    previous = done[-1] if done else ""
    if previous == "--to":
        return _files(files, partial)
    if previous == "--kind":
        return list(PLOT_KINDS)
    if previous == "--value":
        named = [w for w in done if not w.startswith("--")]
        return list(table_columns.get(named[0], ())) if named else []
    plain = [w for i, w in enumerate(done) if not w.startswith("--") and not (i and done[i - 1].startswith("--"))]
    arguments = getattr(command, "arguments", ())
    options = list(_PLOT_OPTIONS) if getattr(command, "name", "") == ".plot" else []
    if len(plain) >= len(arguments):
        return options
    return _argument_candidates(arguments[len(plain)], partial, meta, tables, files) + options


def _argument_candidates(kind: str, partial: str, meta: Mapping[str, object], tables: list[str],
                         files: FileLister | None) -> list[str]:
    if kind == "table":
        return tables
    if kind == "file":
        return _files(files, partial)
    if kind == "command":
        names = sorted(name for name in meta if name.startswith("."))
        return names if partial.startswith(".") else [name[1:] for name in names]
    return kind.split("|")


def _files(files: FileLister | None, partial: str) -> list[str]:
    """Paths for a file argument; a quote already typed stays in front of them."""
    if files is None:
        return []
    quote = partial[:1] if partial[:1] in ("'", '"') else ""
    return sorted(quote + path for path in files(partial[len(quote):]))


def list_files(prefix: str) -> list[str]:
    """Paths starting with `prefix` (folders end with /; dot files only when asked for)."""
    folder, slash, start = prefix.rpartition("/")
    base = os.path.expanduser(folder + slash) if slash else "."
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.startswith(start) and (start.startswith(".") or not entry.startswith(".")):
            path = folder + slash + entry
            out.append(path + "/" if os.path.isdir(os.path.join(base, entry)) else path)
    return out
