"""The interactive shell on prompt_toolkit (kept thin: the logic lives in session/meta/format).

Enter runs the input when (pgcli's rule, plus one-liners):
- it is a meta-command (starts with `.`), `quit`/`exit`, or empty;
- it ends with `;` outside quotes and comments;
- it is a single line of complete tdbql statements (`topk 5 act` runs at once; SQL waits for `;`).
Otherwise Enter starts a new line; Esc then Enter runs the input whatever it holds.
Ctrl-C clears the input, or cancels a running query and keeps the session; Ctrl-D quits.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.lexers import PygmentsLexer

from ..grammar.parse import parse
from ..query.catalog import SCALAR_NAMES
from ..query.errors import TdbqlError
from .completion import complete
from .format import ProgressBar
from .lexer import TdbqlLexer
from .meta import ShellState, emit, is_meta, run_script
from .session import Session
from .text import render_error

PROMPT = "tdbql> "
CONTINUATION = "   ...> "
WORD_BEFORE_CURSOR = re.compile(r"[A-Za-z0-9_]*$")  # the partial word complete() replaces


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


def should_submit(text: str, parses: Callable[[str], bool]) -> bool:
    """Whether Enter runs `text` (see the module docstring); `parses` tells complete tdbql."""
    stripped = text.strip()
    if not stripped or is_meta(stripped) or stripped.lower() in ("quit", "exit"):
        return True
    if last_significant_char(text) == ";":
        return True
    return "\n" not in stripped and parses(stripped)


def is_complete_tdbql(text: str) -> bool:
    """Whether `text` parses as tdbql statements only (SQL waits for its ';', as in pgcli)."""
    try:
        statements = parse(text)
    except Exception:  # a syntax error (or the parser's own bug) means: keep editing
        return False
    return bool(statements) and all(stmt.kind != "sql" for stmt, _ in statements)


class TdbqlCompleter(Completer):
    """prompt_toolkit adapter over the pure `complete(text, cursor, ...)`."""

    def __init__(self, catalog: Callable[[], tuple[Iterable[str], Iterable[str], Iterable[str]]]) -> None:
        self.catalog = catalog

    def get_completions(self, document, complete_event):
        scalars, tables, columns = self.catalog()
        prefix = WORD_BEFORE_CURSOR.search(document.text_before_cursor).group(0)
        try:
            candidates = complete(document.text, document.cursor_position, scalars=scalars, tables=tables,
                                  columns=columns)
        except Exception:
            return
        for candidate in candidates:
            if candidate.lower().startswith(prefix.lower()):
                yield Completion(candidate, start_position=-len(prefix))


class Catalog:
    """Names for completion, refreshed after each input (never read from DuckDB while typing)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.refresh()

    def refresh(self) -> None:
        self.tables = self.session.table_names()
        self.columns = sorted({c for cols in self.session.columns().values() for c in cols})

    def __call__(self):
        return SCALAR_NAMES, self.tables, self.columns


def key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @Condition
    def submit_now() -> bool:
        return should_submit(get_app().current_buffer.text, is_complete_tdbql)

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


def handle_input(state: ShellState, text: str, debug: bool = False) -> None:
    """Run one submitted input (meta-command or statements) and show what it gives."""
    stripped = text.strip()
    if not stripped:
        return
    if stripped.lower() in ("quit", "exit"):
        state.quit = True
        return
    try:
        for output in run_script(state, text):
            emit(state, output)
    except TdbqlError as err:
        emit(state, getattr(err, "partial_output", ""))  # what a .read showed before its error
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
        key_bindings=key_bindings(),
        bottom_toolbar=lambda: toolbar_text(session),
        enable_history_search=False,
    )


def run_repl(session: Session, *, mode: str = "table", debug: bool = False) -> int:
    # A parent that ignores SIGINT (some launchers do) would leave Ctrl-C dead in here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    state = ShellState(session=session, mode=mode)
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
