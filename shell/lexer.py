"""Pygments lexer for tdbql and the SQL beside it (used by the REPL's highlighting).

The DSL keywords come from the grammar (`tdbql.grammar.parse.KEYWORDS`), the scalar names from
the catalog (`query/catalog.py`), so highlighting cannot drift from the parser. SQL keywords come from
pygments' PostgreSQL list (a superset of what DuckDB users type).
"""

from __future__ import annotations

import re

from pygments.lexer import RegexLexer, words
from pygments.lexers._postgres_builtins import KEYWORDS as SQL_KEYWORDS
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Text, Whitespace

from ..grammar.parse import KEYWORDS as DSL_KEYWORDS
from ..query import catalog

SCALARS = catalog.SCALAR_NAMES

NODE_WORDS = tuple(sorted(set(catalog.WRITTEN_COMPONENTS) | set(catalog.NODE_REFS), key=len, reverse=True))
DSL_WORDS = tuple(sorted({k.lower() for k in DSL_KEYWORDS} - set(SCALARS), key=len, reverse=True))
SQL_WORDS = tuple(sorted({k.lower() for k in SQL_KEYWORDS} - set(DSL_WORDS) - set(SCALARS), key=len, reverse=True))


class TdbqlLexer(RegexLexer):
    """tdbql statements, SQL, `--` comments, meta-commands (`.tables`, `\\dt`, `help`) and `$params`."""

    name = "tdbql"
    aliases = ["tdbql", "tql"]
    filenames = ["*.tql"]
    flags = re.IGNORECASE | re.MULTILINE

    tokens = {
        "root": [
            (r"^[ \t]*\.[A-Za-z_]\w*|^[ \t]*\\[A-Za-z?]+|^[ \t]*help\b", Keyword.Pseudo),
            (r"[ \t\r]*\n|[ \t\r]+", Whitespace),  # a newline ends a token, so the next line's `^` rules apply
            (r"--.*?$", Comment.Single),
            (r"\$[A-Za-z_]\w*", Name.Variable),
            (r"'(''|[^'])*'", String.Single),
            (r'"(\\\\|\\"|[^"])*"', String.Double),
            (r"-?\d+\.\d*([eE][-+]?\d+)?|-?\d*\.\d+([eE][-+]?\d+)?|-?\d+[eE][-+]?\d+", Number.Float),
            (r"-?\d+", Number.Integer),
            (r"blocks\.\d+\.[\w.]+", Name.Builtin),
            (words(NODE_WORDS, prefix=r"\b", suffix=r"(?=\[)"), Name.Class),
            (words(SCALARS, prefix=r"\b", suffix=r"\b"), Name.Function),
            (words(DSL_WORDS, prefix=r"\b", suffix=r"\b"), Keyword),
            (words(SQL_WORDS, prefix=r"\b", suffix=r"\b"), Keyword),
            (r"[A-Za-z_]\w*", Name),
            (r"\.\.|<=|>=|!=|<>|[=<>@:+*/%-]", Operator),
            (r"[\[\](),;.]", Punctuation),
            (r".", Text),
        ]
    }
