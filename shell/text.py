"""Pure text helpers of the shell: `$name` parameters, SQL identifiers, where statements start, and
how an error is placed and shown (`file:line:col: message`, the source line, a caret)."""

from __future__ import annotations

import re

import duckdb

from ..grammar.split import split_statements
from ..query.context import ModelInfo
from ..query.errors import TdbqlError, nearest
from ..query.plan import Span


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


SQL_ROW_RESULT_WORDS = frozenset(
    "select with from values table describe show summarize pivot unpivot pragma explain call".split()
)
SQL_ROW_COUNT_WORDS = frozenset({"insert", "update", "delete", "copy", "merge"})

PARAM_PATTERN = re.compile(r"--[^\n]*|\$\$|\$([A-Za-z_]\w*)")


def substitute_params(text: str, params: dict[str, str]) -> str:
    """Replace `$name` by its -D value (outside `--` comments); an unknown name is an error."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name is None:
            return match.group(0)
        if name not in params:
            line = text.count("\n", 0, match.start()) + 1
            column = match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1
            raise TdbqlError(f"undefined parameter ${name} (define it with -D {name}=VALUE)", line=line,
                             column=column, source=text, suggestion=nearest(name, params))
        return str(params[name])

    return PARAM_PATTERN.sub(replace, text)


def parse_prefix(text: str, err: TdbqlError, parse) -> list:
    """The statements wholly before the one holding a syntax error (they run before it is raised)."""
    if err.line is None:
        return []
    cut = statement_start(text, offset_of(text, err.line, err.column or 1))
    if not text[:cut].strip():
        return []
    try:
        return parse(text[:cut])
    except TdbqlError:
        return []


def offset_of(text: str, line: int, column: int) -> int:
    lines = text.splitlines(keepends=True)
    return sum(len(x) for x in lines[: line - 1]) + column - 1


def statement_start(text: str, offset: int) -> int:
    """Start of the statement holding `offset` (the start of its line if the text cannot be split)."""
    try:
        chunks = split_statements(text)
    except TdbqlError:
        return text.rfind("\n", 0, offset) + 1
    starts = [c.start for c in chunks if c.start <= offset]
    return starts[-1] if starts else 0


def first_word(text: str) -> str:
    body = re.sub(r"^(\s|--[^\n]*\n?)*", "", text)
    match = re.match(r"\(*\s*([A-Za-z_]\w*)", body)
    return match.group(1).lower() if match else ""


def locate(err: TdbqlError, span: Span, text: str) -> TdbqlError:
    """Give a position-less error (from the engine or loader) the statement's line and column."""
    if err.line is None:
        err.line, err.column = span.line, span.column
        if err.source is None:
            err.source = text
    return err


def with_source(err: TdbqlError, source_name: str | None, text: str) -> TdbqlError:
    err.source_name = source_name  # read by render_error
    return err


def render_error(err: TdbqlError) -> str:
    """The message a user sees: `file:line:col: message` with the source line and a caret."""
    return err.render(getattr(err, "source_name", None))


def duckdb_message(exc: duckdb.Error) -> str:
    return str(exc).strip()


def is_interrupt(exc: Exception) -> bool:
    """DuckDB reports a Ctrl-C as InterruptException, or as RuntimeError('Query interrupted')."""
    return isinstance(exc, duckdb.InterruptException) or (
        isinstance(exc, RuntimeError) and "Query interrupted" in str(exc))


def describe_model(info: ModelInfo, settings) -> str:
    saes = f", {len(info.sae_latents)} autoencoders" if info.sae_latents else ""
    return (f"model {info.name} ({info.arch}: {info.n_layers} layers, {info.n_heads} heads, d_model {info.d_model}, "
            f"d_mlp {info.d_mlp}, vocab {info.vocab_size}{saes}) on {settings.device} in {settings.dtype}")
