"""Where what the shell shows goes: data to the screen or to an `.output`/`.once` file, status to
wherever it does not mix with the data.

Each statement or meta-command shows a `Shown`: a result table and data text (what was asked
for), and status (what happened: `1 prompt`, `target: ...`, `Run Time`, a setting's confirmation).
Status goes to stdout after the data only when the data is a table for people on stdout; with
`--format csv|json|...` or an output file it goes to stderr, so stdout or the file holds only data.
"""

from __future__ import annotations

import os
import pydoc
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..query.errors import TdbqlError
from .display import fits
from .format import (
    DEFAULT_MAX_ROWS,
    HUMAN_FORMATS,
    format_for_path,
    format_table,
    write_parquet,
)
from .text import first_word


@dataclass
class Shown:
    """What one statement or meta-command shows."""

    table: pa.Table | None = None
    data: str = ""  # text that is the answer (.tables, explain's plan)
    status: str = ""  # text about what ran

    @property
    def has_data(self) -> bool:
        return self.table is not None or bool(self.data)


@dataclass
class Sink:
    """An output file: its format comes from its extension, else the shell's mode."""

    path: Path
    format: str | None
    tables_written: int = 0


@dataclass
class ShellState:
    """What the shell remembers between inputs besides the session."""

    session: object
    mode: str = "table"
    output: Sink | None = None
    once: Sink | None = None
    timer: bool = False
    max_rows: int | None = DEFAULT_MAX_ROWS
    pager: bool = True
    width: int | None = None  # the table mode's width; None: the terminal's when stdout is one
    expanded: str = "off"  # on, off or auto (\x): the table mode shown as lines
    quit: bool = False
    last_plot: Path | None = None
    open_pages: bool = False  # `.html` without a file opens the page in the browser (the REPL)

    def render(self, table: pa.Table, mode: str | None = None, width: int | None = None) -> str:
        mode = mode or self.mode
        width = width or self.width
        expanded = self.expanded == "on" or (
            self.expanded == "auto" and not fits(table, max_rows=self.max_rows, width=width))
        return format_table(table, mode, max_rows=self.max_rows, width=width, expanded=expanded)

    def text(self, shown: Shown) -> str:
        """Everything a Shown holds as one text (data, then status)."""
        parts = [self.render(shown.table)] if shown.table is not None else []
        return "\n".join(p for p in (*parts, shown.data, shown.status) if p)


def shown_for(result, timer: bool) -> Shown:
    """A statement's result: its table; its message as data for explain, as status otherwise."""
    shown = Shown(table=result.table)
    message = result.message or ""
    if result.table is None and first_word(result.text) == "explain":
        shown.data = message
    else:
        shown.status = message
    if timer:
        shown.status = "\n".join(s for s in (shown.status, f"Run Time: {result.elapsed_ms / 1000:.3f} s") if s)
    return shown


def open_sink(path: Path) -> Sink:
    """An output file, emptied now (so a bad path is reported at once)."""
    try:
        path.write_bytes(b"")
    except OSError as exc:
        raise TdbqlError(f"cannot write '{path}': {exc.strerror}") from exc
    return Sink(path, format_for_path(path))


def emit(state: ShellState, shown: Shown | str) -> None:
    """Data to the `.once` file, the `.output` file or stdout; status where it does not mix with it."""
    if isinstance(shown, str):
        shown = Shown(data=shown)
    sink = state.once or state.output
    to_file = sink is not None and shown.has_data and not (shown.table is None and _format(state, sink) == "parquet")
    if to_file:
        _write(state, sink, shown)
        if sink is state.once:
            state.once = None
    elif shown.has_data:
        _print_data(state, shown)
    if shown.status:
        human_stdout = sink is None and state.mode in HUMAN_FORMATS
        print(shown.status, file=sys.stdout if human_stdout else sys.stderr, flush=True)


def _format(state: ShellState, sink: Sink) -> str:
    return sink.format or state.mode


def _write(state: ShellState, sink: Sink, shown: Shown) -> None:
    fmt = _format(state, sink)
    if fmt == "parquet":
        if sink.tables_written:
            raise TdbqlError(f"'{sink.path}' already holds a result and a parquet file holds one table: "
                             "write each result with .once FILE.parquet")
        write_parquet(shown.table, sink.path)
        sink.tables_written += 1
        return
    parts = [state.render(shown.table, fmt)] if shown.table is not None else []
    text = "\n".join(p for p in (*parts, shown.data) if p)
    try:
        with sink.path.open("a", encoding="utf-8") as handle:
            handle.write(text + "\n")
    except OSError as exc:
        raise TdbqlError(f"cannot write '{sink.path}': {exc.strerror}") from exc
    sink.tables_written += shown.table is not None


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _print_data(state: ShellState, shown: Shown) -> None:
    """Print, or page when longer or wider than the terminal."""
    tty = stdout_is_terminal()
    size = shutil.get_terminal_size((80, 24))
    width = state.width or (size.columns if tty else None)
    parts = [state.render(shown.table, width=width)] if shown.table is not None else []
    text = "\n".join(p for p in (*parts, shown.data) if p)
    too_long = text.count("\n") + 2 > size.lines
    too_wide = max(len(line) for line in text.splitlines()) > size.columns
    if state.pager and tty and (too_long or too_wide):
        os.environ.setdefault("LESS", "-SRXF")
        pydoc.pager(text)
        return
    print(text, flush=True)
