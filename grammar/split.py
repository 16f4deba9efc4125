"""Cut a program into statements and tell SQL from tdbql.

Rules (docs/language.md, "Statements"):
- Statements are separated by `;` or newlines; `--` starts a comment that runs to the end of the line.
- A tdbql statement ends at the first `;` or newline outside quotes and parentheses (so a
  parenthesised SQL subquery may span lines), except that a line whose first word is a clause
  keyword (`CONTINUATION_WORDS`: of, where, and, by, ablate, trace, over, as, patch, verify,
  steer) continues it.
- A statement whose first word is a SQL keyword (`SQL_KEYWORDS`) is SQL: it runs to the next `;`
  outside quotes and comments (or the end of input), may span lines, and goes to DuckDB unchanged.
- `select` is a tdbql node query when the word after it is a scalar name (or within difflib's
  reach of one) and no top-level `from` follows before the next line that starts a statement
  (a patch clause's `patch ... from clean|corrupt` does not count); otherwise it is SQL. `explain` is tdbql when a tdbql query follows it, SQL otherwise.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..query.catalog import SCALAR_NAMES as SCALARS
from ..query.errors import TdbqlError

SQL_KEYWORDS: frozenset[str] = frozenset(
    """select with from create insert copy describe desc show drop pragma update delete alter
    summarize attach detach export import install load call checkpoint vacuum analyze begin
    commit rollback use truncate pivot unpivot values merge reset explain""".split()
)
DSL_QUERY_STARTS: frozenset[str] = frozenset(
    {"topk", "bottomk", "select", "logits", "logprobs", "logit_lens", "upvoted", "routes", "metric", "patching", "generate"}
)
DSL_STATEMENT_STARTS: frozenset[str] = DSL_QUERY_STARTS | {
    "model", "sae", "prompt", "prompts", "target", "set", "explain",
}

# A line starting with one of these continues the tdbql statement above it.
CONTINUATION_WORDS: frozenset[str] = frozenset(
    {"of", "where", "and", "by", "ablate", "trace", "over", "as", "patch", "verify", "steer"}
)

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Chunk:
    """One statement: text[start:end] (comments and blanks at its end trimmed)."""

    start: int
    end: int
    is_sql: bool


def split_statements(text: str) -> list[Chunk]:
    chunks: list[Chunk] = []
    pos = _skip_blanks(text, 0)
    while pos < len(text):
        is_sql = starts_sql(text, pos)
        stop = _sql_end(text, pos) if is_sql else _dsl_end(text, pos)
        chunks.append(Chunk(pos, _trim_end(text, pos, stop), is_sql))
        pos = _skip_blanks(text, stop)
    return chunks


def word_at(text: str, pos: int) -> str:
    match = _WORD.match(text, pos)
    return match.group(0).lower() if match else ""


def starts_sql(text: str, pos: int) -> bool:
    """Whether the statement starting at `pos` is SQL (see the module docstring)."""
    if text.startswith("(", pos):
        return True
    word = word_at(text, pos)
    if word not in SQL_KEYWORDS:
        return False
    after = _skip_spaces(text, pos + len(word))
    if word == "select":
        return not _is_dsl_select(text, pos, after)
    if word == "explain":
        next_word = word_at(text, after)
        if next_word == "select":
            return not _is_dsl_select(text, after, _skip_spaces(text, after + 6))
        return next_word not in DSL_QUERY_STARTS
    return True


def _is_dsl_select(text: str, select_pos: int, first_item: int) -> bool:
    first = word_at(text, first_item)
    if not first or text[first_item + len(first) : first_item + len(first) + 1] == ".":
        return False
    if first not in SCALARS and not difflib.get_close_matches(first, SCALARS, n=1, cutoff=0.8):
        return False
    words = _top_level_words(text, first_item, _select_extent(text, select_pos))
    # `patch ... from clean|corrupt` is tdbql's; any other top-level `from` makes it SQL
    return not any(w == "from" and not ("patch" in words[:i] and words[i + 1:i + 2] in (["clean"], ["corrupt"]))
                   for i, w in enumerate(words))


def _select_extent(text: str, pos: int) -> int:
    """End of a `select`: the next `;`, or a newline followed by a line starting a statement."""
    end = _sql_end(text, pos)
    for match in re.finditer(r"\n[ \t]*([A-Za-z_]+)", text[pos:end]):
        word = match.group(1).lower()
        if word in DSL_STATEMENT_STARTS or (word in SQL_KEYWORDS and word != "from"):
            return pos + match.start()
    return end


def _top_level_words(text: str, start: int, end: int) -> list[str]:
    words, depth, pos = [], 0, start
    while pos < end:
        if (skipped := _skip_literal(text, pos, sql=True)) is not None:
            pos = skipped
            continue
        char = text[pos]
        depth += {"(": 1, ")": -1}.get(char, 0)
        match = _WORD.match(text, pos)
        if match and (pos == 0 or not (text[pos - 1].isalnum() or text[pos - 1] == "_")):
            if depth == 0:
                words.append(match.group(0).lower())
            pos = match.end()
            continue
        pos += 1
    return words


def _dsl_end(text: str, pos: int) -> int:
    """Index of the `;` or newline ending a tdbql statement (or len(text))."""
    depth = 0
    while pos < len(text):
        if (skipped := _skip_literal(text, pos, sql=False)) is not None:
            pos = skipped
            continue
        char = text[pos]
        if char == ";" or (char == "\n" and depth <= 0 and not _continues(text, pos + 1)):
            return pos
        depth += {"(": 1, ")": -1}.get(char, 0)
        pos += 1
    return pos


def _continues(text: str, line_start: int) -> bool:
    return word_at(text, _skip_spaces(text, line_start)) in CONTINUATION_WORDS


def _sql_end(text: str, pos: int) -> int:
    """Index of the `;` ending a SQL statement (or len(text))."""
    while pos < len(text):
        if (skipped := _skip_literal(text, pos, sql=True)) is not None:
            pos = skipped
            continue
        if text[pos] == ";":
            return pos
        pos += 1
    return pos


def _skip_literal(text: str, pos: int, *, sql: bool) -> int | None:
    """Index just past the string or comment starting at `pos`, or None if none starts there.
    SQL strings may span lines and SQL has `/* */` comments; tdbql strings stay on one line."""
    if text[pos] in "'\"":
        return _string_end(text, pos, allow_newline=sql)
    if text.startswith("--", pos):
        return _line_end(text, pos)
    if sql and text.startswith("/*", pos):
        close = text.find("*/", pos + 2)
        return len(text) if close < 0 else close + 2
    return None


def _string_end(text: str, pos: int, *, allow_newline: bool) -> int:
    """Index just past the string literal opening at `pos`; raises if it is not closed."""
    quote, cursor = text[pos], pos + 1
    while cursor < len(text):
        char = text[cursor]
        if char == "\\" and not allow_newline:  # tdbql strings use backslash escapes
            cursor += 2
            continue
        if char == quote:
            if allow_newline and text.startswith(quote * 2, cursor):  # SQL doubles quotes
                cursor += 2
                continue
            return cursor + 1
        if char == "\n" and not allow_newline:
            break
        cursor += 1
    raise unterminated_string(text, pos)


def unterminated_string(text: str, pos: int) -> TdbqlError:
    line, column = line_col(text, pos)
    return TdbqlError("unterminated string", line=line, column=column, source=text)


def line_col(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of offset `pos`."""
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r":
        pos += 1
    return pos


def _skip_blanks(text: str, pos: int) -> int:
    """Skip whitespace, `;` and comments between statements."""
    while pos < len(text):
        if text[pos] in " \t\r\n;":
            pos += 1
        elif text[pos] not in "'\"" and (skipped := _skip_literal(text, pos, sql=True)) is not None:
            pos = skipped
        else:
            break
    return pos


def _trim_end(text: str, start: int, stop: int) -> int:
    """Drop trailing whitespace and a trailing `--` comment from text[start:stop]."""
    body = text[start:stop].rstrip()
    while (comment := _comment_start(body, body.rfind("\n") + 1)) is not None:
        body = body[:comment].rstrip()
    return start + len(body)


def _comment_start(body: str, line_start: int) -> int | None:
    pos = line_start
    while pos < len(body):
        if body[pos] in "'\"":
            quote, pos = body[pos], pos + 1
            while pos < len(body) and body[pos] != quote:
                pos += 2 if body[pos] == "\\" else 1
            pos += 1
            continue
        if body.startswith("--", pos):
            return pos
        pos += 1
    return None
