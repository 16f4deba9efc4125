"""Text -> plan statements, with errors a person can act on.

    >>> [stmt for stmt, _ in parse("topk 5 act of mlp")]
    [NodeQuery(kind='nodes', mode='topk', k=5, scalars=(ScalarSpec(name='act', params=()),), ...)]

`parse` raises only `TdbqlError` (line, column, the source line with a caret, what was expected in
words, the nearest valid name for misspellings); lark's exceptions never escape.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from lark import Lark, Token
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError
from lark.lexer import PatternStr

from ..query.errors import TdbqlError, nearest
from ..query.plan import Span, SqlStmt, Statement
from .split import CONTINUATION_WORDS, DSL_STATEMENT_STARTS, SQL_KEYWORDS, Chunk, line_col, split_statements
from .transform import NameProblem, to_plan

__all__ = ["parse", "parser", "KEYWORDS", "SQL_KEYWORDS", "TOKEN_TYPES", "name_role", "tokens_before"]


class _NameEverywhere:
    """Post-lexer that makes the contextual lexer try NAME in every state: `wherex` then lexes as
    one unexpected NAME (with a did-you-mean) instead of the keyword `where` plus a stray `x`."""

    always_accept = ("NAME",)

    def process(self, stream: Iterable[Token]) -> Iterable[Token]:
        return stream


@functools.cache
def parser() -> Lark:
    """The LALR parser, built once per process (and its tables cached on disk by lark)."""
    return Lark.open_from_package(
        "tdbql.grammar",
        "tdbql.lark",
        parser="lalr",
        strict=True,
        propagate_positions=True,
        maybe_placeholders=False,
        postlex=_NameEverywhere(),
        cache=True,  # the LALR tables (and strict checks) are computed once per grammar version
    )


def _terminal_words() -> dict[str, str]:
    """Terminal name -> its literal text, for keyword and punctuation terminals."""
    return {t.name: t.pattern.value for t in parser().terminals if isinstance(t.pattern, PatternStr)}


LITERALS: dict[str, str] = _terminal_words()
KEYWORDS: frozenset[str] = frozenset(w.lower() for w in LITERALS.values() if w.replace("_", "").isalpha())
TOKEN_TYPES: dict[str, str] = {
    name: ("keyword" if text.replace("_", "").isalpha() else "punctuation") for name, text in LITERALS.items()
} | {
    "NAME": "name",
    "INT": "number",
    "FLOAT": "number",
    "STRING": "string",
    "HOOK": "name",
    "LOCATION": "keyword",
    "MODEL_REF": "name",
    "SUBQUERY": "sql",
    "DIR_SIGN": "punctuation",
    "COMMENT": "comment",
    "WS": "whitespace",
}


def parse(text: str) -> list[tuple[Statement, Span]]:
    """Parse a program into (statement, span) pairs. Raises TdbqlError only."""
    try:
        chunks = split_statements(text)
        return [(_parse_chunk(text, chunk), _span(text, chunk)) for chunk in chunks]
    except TdbqlError:
        raise
    except RecursionError:
        raise TdbqlError("statement is nested too deeply") from None


def _span(text: str, chunk: Chunk) -> Span:
    line, column = line_col(text, chunk.start)
    end_line, end_column = line_col(text, chunk.end)
    return Span(
        line=line, column=column, end_line=end_line, end_column=end_column,
        start_pos=chunk.start, end_pos=chunk.end,
    )


def _parse_chunk(text: str, chunk: Chunk) -> Statement:
    body = text[chunk.start : chunk.end]
    if chunk.is_sql:
        return SqlStmt(text=body)
    try:
        tree = parser().parse(body)
        return to_plan(tree)
    except UnexpectedInput as err:
        raise _syntax_error(text, chunk, err) from None
    except VisitError as err:
        if isinstance(err.orig_exc, NameProblem):
            problem = err.orig_exc
            raise _error(text, chunk.start + problem.pos, problem.message, problem.suggestion) from None
        raise _error(text, chunk.start, f"invalid statement: {err.orig_exc}") from None
    except LarkError as err:
        raise _error(text, chunk.start, f"invalid statement: {err}") from None


def _error(text: str, pos: int, message: str, suggestion: str | None = None) -> TdbqlError:
    line, column = line_col(text, pos)
    return TdbqlError(message, line=line, column=column, source=text, suggestion=suggestion)


# --- syntax errors in words ------------------------------------------------------------------------


def _syntax_error(text: str, chunk: Chunk, err: UnexpectedInput) -> TdbqlError:
    body = text[chunk.start : chunk.end]
    if isinstance(err, UnexpectedToken):
        token = err.token
        pos = len(body) if token.type == "$END" else token.start_pos
        expected = set(err.accepts or err.expected)
        found = "end of statement" if token.type == "$END" else _quoted(str(token))
    elif isinstance(err, UnexpectedCharacters):
        pos = err.pos_in_stream
        expected = accepts_after(body[:pos]) or set(err.allowed or ())
        found = f"character '{body[pos]}'"
    else:
        pos, expected, found = len(body), set(), "input"
    word = str(err.token) if isinstance(err, UnexpectedToken) and err.token.type != "$END" else ""
    if pos == 0 and word:
        if word.lower() in CONTINUATION_WORDS | {"vs", "via"}:
            message = f"'{word}' cannot start a statement; write the clause on the line of its query"
            return _error(text, chunk.start, message)
        return _error(text, chunk.start, f"unknown statement '{word}'", _nearest_statement(word))
    role = name_role(tokens_before(body[:pos]))
    message = f"unexpected {found}"
    if expected:
        message += f"; expected {describe_expected(expected, role)}"
    suggestion = nearest(word, [LITERALS[t].lower() for t in expected if t in LITERALS]) if word else None
    return _error(text, chunk.start + pos, message, suggestion)


def _quoted(text: str) -> str:
    return text if text[:1] in "'\"" else f"'{text}'"


def _nearest_statement(word: str) -> str | None:
    return nearest(word, sorted(DSL_STATEMENT_STARTS)) or nearest(word, sorted(SQL_KEYWORDS))


ROLE_NAMES: dict[str, str] = {
    "scalar": "a scalar name",
    "parameter": "a parameter name",
    "component": "a component (mlp, attn, head, sae, embed)",
    "field": "a field name",
    "group key": "a group key (layer, token, prompt, component)",
    "node kind": "a node such as mlp[L,N]",
    "trace path": "q, k, qk or v",
    "reduction": "mean, sum or max",
    "table": "a table name",
    "setting": "a setting name",
    "site": "mlp, attn or resid",
    "dtype": "fp32, bf16 or fp16",
    "switch": "on or off",
    "mode": "cell or edge",
    "patch source": "clean or corrupt",
    "sweep": "head, attn, mlp, neuron, resid.pre, resid.mid, resid.post or latent",
}
_VALUE_WORDS: dict[str, str] = {
    "INT": "an integer",
    "STRING": "a quoted string",
    "MODEL_REF": "a model name or path",
    "HOOK": "a hook name",
    "LOCATION": "resid.pre, resid.mid or resid.post",
    "SUBQUERY": "a (subquery)",
}


def describe_expected(expected: Iterable[str], role: str | None) -> str:
    """Terminal names -> 'a scalar name, a number or ','' (values, then keywords, then symbols)."""
    expected = set(expected)
    words: list[str] = []
    if "NAME" in expected and role != "value":
        words.append(ROLE_NAMES.get(role or "", "a name"))
    if "FLOAT" in expected:
        words.append("a number")
        expected.discard("INT")
    words += [_VALUE_WORDS[t] for t in sorted(expected) if t in _VALUE_WORDS]
    if "NAME" in expected and role == "value":
        words.append("a name")
    literal_terms = sorted((LITERALS[t] for t in expected if t in LITERALS), key=lambda w: (not w[0].isalpha(), w))
    words += [f"'{w.lower()}'" for w in literal_terms]
    if "$END" in expected:
        words.append("the end of the statement")
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def accepts_after(text: str) -> set[str]:
    """Terminal names the parser accepts after `text` (empty when `text` itself does not parse)."""
    try:
        interactive = parser().parse_interactive(text)
        interactive.exhaust_lexer()
        return set(interactive.accepts())
    except (LarkError, RecursionError):
        return set()


def tokens_before(text: str) -> list[Token]:
    """The tokens the LALR parser accepts from the start of `text`, stopping at the first error."""
    tokens: list[Token] = []
    try:
        interactive = parser().parse_interactive(text)
        for token in interactive.iter_parse():
            tokens.append(token)
    except (LarkError, RecursionError):
        pass
    return tokens


_ROLE_AFTER_KEYWORD: dict[str, str] = {
    "topk": "scalar", "bottomk": "scalar", "select": "scalar",
    "of": "component", "where": "field", "and": "field", "by": "group key",
    "ablate": "node kind", "trace": "node kind", "upvoted": "node kind",
    "via": "trace path", "over": "reduction", "as": "table", "set": "setting",
    "sae": "site", "dtype": "dtype", "ln_f": "switch", "renormalize": "switch", "mode": "mode",
    "patch": "node kind", "from": "patch source", "steer": "node kind",
}
_COMPARISONS = frozenset({"=", "!=", "<>", "<", "<=", ">", ">="})


def name_role(tokens: Sequence[Token]) -> str | None:
    """What a NAME right after `tokens` would mean: 'scalar', 'component', 'field', ..."""
    role: str | None = None
    for token in tokens:
        word = str(token).lower()
        if token.type in LITERALS and word in _ROLE_AFTER_KEYWORD:
            if not (word == "and" and role != "value"):  # `between 1 and 2` keeps the role
                role = _ROLE_AFTER_KEYWORD[word]
            if word == "of" and str(tokens[0]).lower() == "patching":
                role = "sweep"
        elif word == "(" and role == "scalar":
            role = "parameter"
        elif word == ")" and role in ("parameter", "parameter value"):
            role = "scalar"
        elif word in _COMPARISONS and role in ("field", "parameter", "setting"):
            role = "value" if role != "parameter" else "parameter value"
        elif word == "," and role == "parameter value":
            role = "parameter"
    return "value" if role == "parameter value" else role
