"""The one error type users see, and the one "did you mean" rule.

Raised by the parser, the binder, the session and the executor; nothing else may reach a user
unless --debug. This module imports nothing of ours.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TdbqlError(Exception):
    """A user-facing error: bad syntax, a name that does not bind, impossible work.

    `str(err)` is the whole message a user sees: `line:col: message`, the source line with a
    caret under the column, and `did you mean ...?` when a nearest valid name is known. The CLI
    prefixes the file name. Raised by the parser, the binder, the session and the executor;
    nothing else may reach a user unless --debug.
    """

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
        source: str | None = None,
        suggestion: str | None = None,
    ) -> None:
        self.message = message
        self.line = line
        self.column = column
        self.source = source
        self.suggestion = suggestion
        super().__init__(self.render())

    def render(self, filename: str | None = None) -> str:
        where = ""
        if self.line is not None:
            where = f"{self.line}:{self.column or 1}: "
        if filename:
            where = f"{filename}:{where}" if where else f"{filename}: "
        text = f"{where}{self.message}"
        if self.suggestion:
            text += f"; did you mean '{self.suggestion}'?"
        if self.source is not None and self.line is not None:
            src_line = self.source.splitlines()[self.line - 1] if self.source.splitlines() else ""
            text += f"\n    {src_line}\n    {' ' * ((self.column or 1) - 1)}^"
        return text


# how every "needs a loss" error ends
LOSS_HINT = "set one with `target \" Mary\" vs \" John\"`"

NEAREST_CUTOFF = 0.65  # difflib similarity a "did you mean" suggestion needs


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to `word` (case-insensitive), or None when nothing is close."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=NEAREST_CUTOFF)
    return lowered[found[0]] if found else None
