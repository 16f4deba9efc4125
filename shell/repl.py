"""The interactive shell on prompt_toolkit (kept thin: the logic lives in session/meta/format).

Enter runs the input unless it is unfinished (pgcli's rule, made honest for one-liners):
- a meta-command (`.tables`, `\\dt`, `help`), `quit`/`exit`, or empty input runs;
- text ending with `;` outside quotes and comments runs;
- an open string or `/* comment` in SQL, SQL without its `;`, or an open parenthesis waits for
  the next line; anything else runs, so a line that does not parse shows its error at once.
`$params` are filled in before this check. Esc then Enter runs the input whatever it holds.
Ctrl-C clears the input, or cancels a running statement and keeps the session (a SQL statement
through DuckDB's own interrupt); Ctrl-D quits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import duckdb
from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.lexers import PygmentsLexer

from ..grammar.split import split_statements
from ..query.catalog import SCALAR_NAMES
from ..query.errors import TdbqlError
from .completion import complete, list_files, word_before
from .format import ProgressBar
from .lexer import TdbqlLexer
from .meta import REGISTRY, ShellState, emit, is_meta, run_items
from .output import open_sink
from .session import Session
from .text import offset_of, render_error, substitute_params

PROMPT = "tdbql> "
CONTINUATION = "   ...> "


def history_path() -> Path:
    """$XDG_CONFIG_HOME/tdbql/history (default ~/.config/tdbql/history)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tdbql" / "history"


def last_significant_char(text: str) -> str:
    """The last character outside quotes and `--` comments ('' if none)."""
    last, quote, i = "", None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
            last = ch
        elif ch in "'\"":
            quote, last = ch, ch
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif not ch.isspace():
            last = ch
        i += 1
    return "" if quote else last


def should_submit(text: str, params: dict[str, str] | None = None) -> bool:
    """Whether Enter runs `text` (see the module docstring). `$params` are filled first, so an
    undefined one is reported at once like any other error."""
    stripped = text.strip()
    if not stripped or is_meta(stripped) or stripped.lower() in ("quit", "exit"):
        return True
    try:
        text = substitute_params(text, params or {})
    except TdbqlError:
        return True
    return last_significant_char(text) == ";" or not is_unfinished(text)


def is_unfinished(text: str) -> bool:
    """An open SQL string or comment, SQL without its closing `;`, or an open parenthesis: what a
    next line can finish. A tdbql statement ends at the end of its line, so one that does not
    parse there is complete and wrong (and so is a tdbql string left open: it cannot span lines)."""
    try:
        chunks = split_statements(text)
    except TdbqlError as err:  # an open string
        offset = offset_of(text, err.line or 1, err.column or 1)
        return split_statements(text[:offset] + "x")[-1].is_sql
    if not chunks:
        return False
    last = chunks[-1]
    return last.is_sql or open_parens(text[last.start:last.end]) > 0


def open_parens(text: str) -> int:
    """Parentheses opened and not closed, outside quotes."""
    depth, quote = 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        else:
            depth += {"(": 1, ")": -1}.get(ch, 0)
    return depth


class TdbqlCompleter(Completer):
    """prompt_toolkit adapter over the pure `complete(text, cursor, **names)`."""

    def __init__(self, names: Callable[[], Mapping[str, object]]) -> None:
        self.names = names

    def get_completions(self, document, complete_event):
        text, cursor = document.text, document.cursor_position
        try:
            partial = word_before(text, cursor)
            candidates = complete(text, cursor, **self.names())
        except Exception:  # completion must never break typing
            return
        for candidate in candidates:
            yield Completion(candidate, start_position=-len(partial))


class Catalog:
    """Names for completion, refreshed after each input (never read from DuckDB while typing)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.refresh()

    def refresh(self) -> None:
        self.table_columns = self.session.columns()

    def __call__(self) -> dict[str, object]:
        return {"scalars": SCALAR_NAMES, "table_columns": self.table_columns, "meta": REGISTRY, "files": list_files}


def key_bindings(session: Session) -> KeyBindings:
    bindings = KeyBindings()

    @Condition
    def submit_now() -> bool:
        return should_submit(get_app().current_buffer.text, session.params)

    @bindings.add("enter", filter=submit_now)
    def _(event):
        event.current_buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _(event):
        event.current_buffer.validate_and_handle()

    return bindings


def toolbar_text(session: Session) -> str:
    model = session.model_name if session.is_loaded else f"{session.model_name} (not loaded)"
    n = len(session.prompts)
    compiled = " (compile on)" if session.settings.compile else ""
    return (f" model: {model} | device: {session.settings.device}{compiled} | prompts: {n} | "
            f"db: {session.db or 'memory'} | .help ")


class DuckdbInterrupt:
    """While a statement runs, Ctrl-C also calls `con.interrupt()` from a thread woken by the
    signal's wakeup fd: Python's own handler runs only when DuckDB next checks for signals, which
    a long operator may not do for many seconds."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.fired = False

    def __enter__(self) -> DuckdbInterrupt:
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while data := self._read.recv(64):
            if signal.SIGINT in data:
                self.fired = True
                self.con.interrupt()

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous)
        self._write.close()
        self._thread.join(timeout=1)
        self._read.close()
        if self.fired:  # an interrupt that came after the statement ended must not hit the next one
            try:
                self.con.execute("SELECT 1").fetchall()
            except duckdb.Error:
                pass


def handle_input(state: ShellState, text: str, debug: bool = False) -> None:
    """Run one submitted input (meta-commands and statements), showing each result as it comes."""
    stripped = text.strip()
    if not stripped:
        return
    if stripped.lower() in ("quit", "exit"):
        state.quit = True
        return
    try:
        with DuckdbInterrupt(state.session.con):
            for shown in run_items(state, text):
                emit(state, shown)
    except TdbqlError as err:
        if debug:
            traceback.print_exception(err)
        print(render_error(err), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr, flush=True)
    except Exception as exc:  # keep the session alive whatever happens
        if debug:
            traceback.print_exception(exc)
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        if isinstance(state.session.progress, ProgressBar):
            state.session.progress.close()


def build_prompt(session: Session, catalog: Catalog) -> PromptSession:
    path = history_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return PromptSession(
        message=PROMPT,
        multiline=True,
        prompt_continuation=lambda width, line_number, wrap_count: CONTINUATION.rjust(width),
        lexer=PygmentsLexer(TdbqlLexer),
        completer=TdbqlCompleter(catalog),
        complete_while_typing=True,
        history=FileHistory(str(path)),
        auto_suggest=AutoSuggestFromHistory(),
        key_bindings=key_bindings(session),
        bottom_toolbar=lambda: toolbar_text(session),
        enable_history_search=False,
    )


def run_repl(session: Session, *, mode: str = "table", debug: bool = False, output: str | None = None) -> int:
    # A parent that ignores SIGINT (some launchers do) would leave Ctrl-C dead in here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    state = ShellState(session=session, mode=mode, open_pages=True)
    if output:
        state.output = open_sink(Path(output).expanduser())
    catalog = Catalog(session)
    prompt = build_prompt(session, catalog)
    print(f"tdbql: type statements, SQL, or .help; Ctrl-D quits. Model: {session.model_name}")
    while not state.quit:
        try:
            text = prompt.prompt()
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        handle_input(state, text, debug)
        catalog.refresh()
    return 0
