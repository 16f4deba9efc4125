"""Scripts: statements and meta-command lines together, for the REPL, `-c`, `-f`, stdin and `.read`.

A meta-command is a statement that starts a line with `.` or `\\` (psql's `\\dt`, `\\x`, ...), or
the word `help`. It runs to the end of its line or to a `;` outside quotes. On its line `--word`
is an option (`.plot t --to x.png`); `--` followed by a space or the end of the line starts a
comment. The commands live in `commands.py`, the registry in `registry.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..grammar.split import split_statements
from ..query.errors import TdbqlError
from . import commands as _commands  # noqa: F401  (registers the meta-commands)
from .output import ShellState, Shown, emit, shown_for
from .registry import REGISTRY, ScriptRun, is_meta, parse_meta
from .text import substitute_params

__all__ = ["REGISTRY", "ShellState", "Shown", "emit", "is_meta", "read_script_file", "run_items", "run_meta",
           "run_script", "script_parts"]

MAX_READ_DEPTH = 32


@dataclass(frozen=True)
class ScriptPart:
    """A meta-command line, or the statements between two of them."""

    meta: bool
    line: int  # 1-based line where the part starts
    column: int  # 1-based column where the part starts
    text: str  # the meta line; or the statements, after newlines that keep the script's line numbers


def starts_meta(text: str, pos: int) -> bool:
    """Whether the statement at `pos` is a meta-command: first on its line, and `.`, `\\` or `help`."""
    line_start = text.rfind("\n", 0, pos) + 1
    return not text[line_start:pos].strip() and is_meta(text[pos:pos + 5])


def meta_line_end(text: str, start: int) -> tuple[int, int]:
    """Where the meta-command at `start` ends, and where the script goes on after it (past a `;`
    or a `-- comment`)."""
    quote, i = None, start
    while i < len(text):
        ch = text[i]
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch == "\n":
            return i, i
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            return i, i + 1
        elif _comment_at(text, i, start):
            end = text.find("\n", i)
            return i, len(text) if end < 0 else end
        i += 1
    return i, i


def _comment_at(text: str, i: int, start: int) -> bool:
    """`--` after a blank and before a blank or the end of the line; `--word` is an option."""
    return (text.startswith("--", i) and (i == start or text[i - 1] in " \t")
            and (i + 2 == len(text) or text[i + 2] in " \t\r\n"))


def script_parts(text: str) -> list[ScriptPart]:
    """Cut a script into meta-command lines and statement runs, in order. Statement runs keep
    everything else of the text, padded so that positions in them are the script's."""
    parts: list[ScriptPart] = []
    start, has_statements = 0, False  # where the text not yet in `parts` begins; whether it has any

    def flush(end: int) -> None:
        if has_statements:
            line = text.count("\n", 0, start) + 1
            column = start - (text.rfind("\n", 0, start) + 1)
            parts.append(ScriptPart(False, line, column + 1, "\n" * (line - 1) + " " * column + text[start:end]))

    chunks, offset = split_statements(text), 0
    while chunks:
        chunk = chunks.pop(0)
        begin = chunk.start + offset
        if not starts_meta(text, begin):
            has_statements = True
            continue
        flush(text.rfind("\n", 0, begin) + 1)
        end, after = meta_line_end(text, begin)
        parts.append(ScriptPart(True, text.count("\n", 0, begin) + 1, begin - text.rfind("\n", 0, begin),
                                text[begin:end].rstrip()))
        start, has_statements = after, False
        if chunks and chunks[0].start + offset >= after and not text[after:chunks[0].start + offset].strip(" \t\r\n;"):
            continue
        chunks, offset = split_statements(text[after:]), after  # the meta line ended elsewhere than the split thought
    flush(len(text))
    return parts


def read_script_file(path: Path) -> str:
    """A script file's text; anything but UTF-8 text is a one-line error."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TdbqlError(f"cannot read '{path}': {exc.strerror}") from exc
    if b"\x00" in data:
        raise TdbqlError(f"cannot read '{path}': it is a binary file, not a script")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TdbqlError(f"cannot read '{path}': not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start})") from None


def run_items(state: ShellState, text: str, source_name: str | None = None, *, confirm_settings: bool = True,
              depth: int = 0) -> Iterator[Shown]:
    """Run a script's statements and meta-commands in order, yielding what each shows. `$name`
    parameters are filled part by part, so a `.param` line applies to what follows it. Stops after
    `.quit`. The first error raises TdbqlError with its file, line and column (a `.read` file's
    own). Without `confirm_settings` (files, -c), `.mode csv` and the like show nothing."""
    try:
        parts = script_parts(text)
    except TdbqlError as err:
        err.source_name = source_name
        raise
    for part in parts:
        if part.meta:
            yield from _run_meta_part(state, part, text, source_name, confirm_settings, depth)
        else:
            for result in state.session.execute_iter(part.text, source_name=source_name):
                yield shown_for(result, state.timer)
        if state.quit:
            return


def _run_meta_part(state: ShellState, part: ScriptPart, text: str, source_name: str | None,
                   confirm_settings: bool, depth: int) -> Iterator[Shown]:
    try:
        command, args = parse_meta(part.text)
        params = state.session.params if state.session is not None else {}
        args = args[:command.fill_from] + _substitute(args[command.fill_from:], part, params)
        out = command.handler(state, args)
        if isinstance(out, ScriptRun):
            if depth >= MAX_READ_DEPTH:
                raise TdbqlError(f".read is nested more than {MAX_READ_DEPTH} deep (does a file read itself?)")
            inner = read_script_file(out.path)
    except TdbqlError as err:
        if err.line is None:
            err.line, err.column = part.line, part.column
        err.source, err.source_name = text, source_name
        raise
    if isinstance(out, ScriptRun):
        yield from run_items(state, inner, str(out.path), confirm_settings=False, depth=depth + 1)
    elif isinstance(out, Shown):
        yield out
    elif out and (confirm_settings or not command.setting):
        yield Shown(status=out) if command.setting else Shown(data=out)


def _substitute(args: list[str], part: ScriptPart, params: dict[str, str]) -> list[str]:
    """`$name` in each argument word (an option word `--to` is left as it is)."""
    out = []
    for word in args:
        try:
            out.append(substitute_params(word, params))
        except TdbqlError as err:
            err.line, err.column = part.line, part.column + max(part.text.find(word), 0) + (err.column or 1) - 1
            raise
    return out


def run_script(state: ShellState, text: str, source_name: str | None = None, *,
               confirm_settings: bool = True) -> Iterator[str]:
    """`run_items`, each shown as one text (table, data, then status)."""
    for shown in run_items(state, text, source_name, confirm_settings=confirm_settings):
        yield state.text(shown)


def run_meta(state: ShellState, line: str) -> str:
    """Run one meta-command line and return what it shows as text (a `.read` shows its file's
    output; on an error, what it showed before is in the error's `partial_output`)."""
    shown: list[str] = []
    try:
        for item in run_items(state, line):
            shown.append(state.text(item))
    except TdbqlError as err:
        err.partial_output = "\n".join(s for s in shown if s)
        raise
    return "\n".join(s for s in shown if s)
