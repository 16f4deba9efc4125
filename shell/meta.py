"""Meta-commands (`.tables`, `.mode csv`, ...): a registry of small handlers.

A handler takes the shell state and its argument words and returns the text to show; it never
prints, so the registry is unit-tested without a terminal. `.help` is generated from the registry
(litecli's `@special_command` idea). Meta-commands are one line and need no `;`.
"""

from __future__ import annotations

import os
import pydoc
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ..grammar.split import split_statements
from ..query import catalog
from ..query.errors import TdbqlError, nearest
from .format import DEFAULT_MAX_ROWS, FORMATS, format_table, render_result
from .prompts import describe_loss
from .session import Session
from .text import describe_model, quote_ident, substitute_params


@dataclass
class ShellState:
    """What the shell remembers between inputs besides the session."""

    session: Session
    mode: str = "table"
    output: Path | None = None
    timer: bool = False
    max_rows: int | None = DEFAULT_MAX_ROWS
    pager: bool = True
    width: int | None = None
    quit: bool = False
    last_plot: Path | None = None

    def render(self, result) -> str:
        return render_result(result, mode=self.mode, max_rows=self.max_rows, timer=self.timer, width=self.width)


Handler = Callable[[ShellState, list[str]], str]


@dataclass(frozen=True)
class MetaCommand:
    name: str
    usage: str
    help: str
    handler: Handler
    aliases: tuple[str, ...] = field(default=())
    setting: bool = False  # changes a shell setting; its output only confirms it


REGISTRY: dict[str, MetaCommand] = {}


def meta_command(name: str, usage: str, help: str, aliases: tuple[str, ...] = (), setting: bool = False):
    """Register a handler under `.name` and its aliases."""

    def register(handler: Handler) -> Handler:
        command = MetaCommand(name, usage, help, handler, aliases, setting)
        for key in (name, *aliases):
            REGISTRY[key] = command
        return handler

    return register


def is_meta(text: str) -> bool:
    return text.lstrip().startswith(".")


def run_meta(state: ShellState, line: str) -> str:
    """Run one meta-command line; unknown commands and bad arguments raise TdbqlError."""
    command, args = parse_meta(line)
    return command.handler(state, args)


def parse_meta(line: str) -> tuple[MetaCommand, list[str]]:
    """The command a meta-command line names, and its argument words."""
    try:
        words = shlex.split(line.strip())
    except ValueError as exc:
        raise TdbqlError(f"cannot read meta-command: {exc}") from exc
    name, args = words[0].lower(), words[1:]
    command = REGISTRY.get(name)
    if command is None:
        raise TdbqlError(f"unknown command '{name}' (try .help)", suggestion=nearest(name, REGISTRY))
    return command, args


# --- scripts: statements and meta-command lines together ------------------------------------------------


@dataclass(frozen=True)
class ScriptPart:
    """A meta-command line, or the statements between two of them."""

    meta: bool
    line: int  # 1-based line where the part starts
    column: int  # 1-based column where the part starts
    text: str  # the meta line; or the statements, after newlines that keep the script's line numbers


def script_parts(text: str) -> list[ScriptPart]:
    """Cut a script (a .tql file, -c text, a pasted block) into meta-command lines and statement
    runs, in order. A meta-command is a statement that starts a line with `.` (so a `.` inside a
    multi-line SQL statement or string is not one); a `--` comment after it is dropped. Statement
    runs keep everything else of the text, padded so that positions in them are the script's."""
    parts: list[ScriptPart] = []
    start, has_statements = 0, False  # where the text not yet in `parts` begins; whether it has any

    def flush(end: int) -> None:
        if has_statements:
            line = text.count("\n", 0, start) + 1
            column = start - (text.rfind("\n", 0, start) + 1)
            parts.append(ScriptPart(False, line, column + 1, "\n" * (line - 1) + " " * column + text[start:end]))

    for chunk in split_statements(text):
        line_start = text.rfind("\n", 0, chunk.start) + 1
        if not (text.startswith(".", chunk.start) and not text[line_start:chunk.start].strip()):
            has_statements = True
            continue
        flush(line_start)
        parts.append(ScriptPart(True, text.count("\n", 0, chunk.start) + 1, chunk.start - line_start + 1,
                                text[chunk.start:chunk.end]))
        start, has_statements = chunk.end + text.startswith(";", chunk.end), False
    flush(len(text))
    return parts


def run_script(state: ShellState, text: str, source_name: str | None = None, *,
               confirm_settings: bool = True) -> Iterator[str]:
    """Run a script's statements and meta-commands in order, yielding what each shows; `$name`
    parameters are filled part by part, so a `.param` line applies to what follows it. Stops after
    `.quit`. The first error raises TdbqlError with the script's line and column. Without
    `confirm_settings` (files and -c run by the CLI), `.mode csv` and the like show nothing, so
    that they do not end up in the CSV."""
    try:
        parts = script_parts(text)
    except TdbqlError as err:
        err.source_name = source_name
        raise
    for part in parts:
        if not part.meta:
            for result in state.session.execute_iter(part.text, source_name=source_name):
                yield state.render(result)
            continue
        try:
            command, args = parse_meta(substitute_params(part.text, state.session.params))
            shown = command.handler(state, args)
        except TdbqlError as err:
            if err.line is None:
                err.line, err.column, err.source = part.line, part.column, text
            err.source_name = source_name
            raise
        # a setting's output only confirms it (`.param` with no arguments lists the parameters)
        if confirm_settings or not command.setting or (not args and command.name == ".param"):
            yield shown
        if state.quit:
            return


def emit(state: ShellState, text: str) -> None:
    """Print, append to the .output file, or page when longer or wider than the terminal."""
    if not text:
        return
    if state.output is not None:
        with state.output.open("a", encoding="utf-8") as handle:
            handle.write(text + "\n")
        return
    size = shutil.get_terminal_size((80, 24))
    too_long = text.count("\n") + 2 > size.lines
    too_wide = max(len(line) for line in text.splitlines()) > size.columns
    if state.pager and sys.stdout.isatty() and (too_long or too_wide):
        os.environ.setdefault("LESS", "-SRXF")
        pydoc.pager(text)
        return
    print(text, flush=True)


# --- handlers ----------------------------------------------------------------------------------------


def _refuse_files_when_safe(state: ShellState, what: str) -> None:
    """--safe runs scripts you did not write: no meta-command reads or writes files either."""
    if state.session is not None and state.session.safe:
        raise TdbqlError(f"{what} is disabled in --safe mode (it reads or writes files)")


def _expect(args: list[str], most: int, usage: str) -> None:
    if len(args) > most:
        raise TdbqlError(f"too many arguments; usage: {usage}")


def _on_off(args: list[str], current: bool, usage: str) -> bool:
    if not args:
        return not current
    value = catalog.switch_value(args[0])
    if value is None:
        raise TdbqlError(f"expected on or off; usage: {usage}")
    return value


# --- commands ------------------------------------------------------------------------------------


@meta_command(".help", ".help", "Show this list.", aliases=("\\?",))
def _help(state: ShellState, args: list[str]) -> str:
    seen, lines = set(), []
    for command in REGISTRY.values():
        if command.name in seen:
            continue
        seen.add(command.name)
        lines.append(f"{command.usage:<34} {command.help}")
    lines.append("")
    lines.append("Enter runs a meta-command, a line of complete tdbql statements, or text ending in ';'")
    lines.append("(SQL always waits for its ';'); otherwise it starts a new line. Esc Enter runs anyway.")
    return "\n".join(lines)


@meta_command(".quit", ".quit", "Leave tdbql (also .exit, Ctrl-D).", aliases=(".exit", ".q"))
def _quit(state: ShellState, args: list[str]) -> str:
    state.quit = True
    return ""


@meta_command(".tables", ".tables", "List tables and views.", aliases=("\\dt",))
def _tables(state: ShellState, args: list[str]) -> str:
    _expect(args, 0, ".tables")
    return "\n".join(state.session.table_names())


@meta_command(".schema", ".schema [TABLE]", "Show the columns of one table or all.", aliases=("\\d",))
def _schema(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".schema [TABLE]")
    names = args or state.session.table_names()
    known = set(state.session.table_names())
    lines = []
    for name in names:
        if name not in known:
            raise TdbqlError(f"no table '{name}'")
        cols = state.session.con.sql(f"DESCRIBE {quote_ident(name)}").fetchall()
        body = ", ".join(f"{c[0]} {c[1]}" for c in cols)
        lines.append(f"{name}({body})")
    return "\n".join(lines)


@meta_command(".mode", ".mode [table|csv|json|markdown]", "Show or set the output format.", setting=True)
def _mode(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".mode [FORMAT]")
    if args:
        if args[0] not in FORMATS:
            raise TdbqlError(f"unknown format '{args[0]}' (formats: {', '.join(FORMATS)})")
        state.mode = args[0]
    return f"mode {state.mode}"


@meta_command(".output", ".output [FILE]", "Write results to FILE (no FILE: back to the screen).", aliases=(".o",),
              setting=True)
def _output(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".output [FILE]")
    if not args:
        state.output = None
        return "output: stdout"
    _refuse_files_when_safe(state, ".output FILE")
    path = Path(args[0]).expanduser()
    try:
        path.write_text("", encoding="utf-8")
    except OSError as exc:
        raise TdbqlError(f"cannot write '{path}': {exc.strerror}") from exc
    state.output = path
    return f"output: {path}"


@meta_command(".read", ".read FILE", "Run the statements of a .tql file.", aliases=("\\i",))
def _read(state: ShellState, args: list[str]) -> str:
    _refuse_files_when_safe(state, ".read")
    if len(args) != 1:
        raise TdbqlError("usage: .read FILE")
    path = Path(args[0]).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TdbqlError(f"cannot read '{path}': {exc.strerror}") from exc
    shown = []
    try:
        for output in run_script(state, text, str(path)):
            shown.append(output)
    except TdbqlError as err:
        err.partial_output = "\n".join(s for s in shown if s)
        raise
    return "\n".join(s for s in shown if s)


@meta_command(".timer", ".timer [on|off]", "Show how long each statement takes.", setting=True)
def _timer(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".timer [on|off]")
    state.timer = _on_off(args, state.timer, ".timer [on|off]")
    return f"timer {'on' if state.timer else 'off'}"


@meta_command(".pager", ".pager [on|off]", "Page long tables with $PAGER (less -SRXF).", setting=True)
def _pager(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".pager [on|off]")
    state.pager = _on_off(args, state.pager, ".pager [on|off]")
    return f"pager {'on' if state.pager else 'off'}"


@meta_command(".maxrows", ".maxrows [N|all]", "Rows shown per table in table mode.", setting=True)
def _maxrows(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".maxrows [N|all]")
    if args:
        if args[0].lower() == "all":
            state.max_rows = None
        elif args[0].isdigit() and int(args[0]) > 0:
            state.max_rows = int(args[0])
        else:
            raise TdbqlError("usage: .maxrows N (a positive integer) or .maxrows all")
    return f"maxrows {state.max_rows or 'all'}"


@meta_command(".param", ".param [NAME [VALUE]]", "Show or set $NAME (like -D NAME=VALUE); no VALUE: unset.",
              setting=True)
def _param(state: ShellState, args: list[str]) -> str:
    params = state.session.params
    if not args:
        return "\n".join(f"${name} = {value}" for name, value in sorted(params.items())) or "no parameters"
    _expect(args, 2, ".param [NAME [VALUE]]")
    name = args[0].lstrip("$")
    if not name.isidentifier():
        raise TdbqlError(f"parameter names are identifiers, not {args[0]!r}")
    if len(args) == 1:
        params.pop(name, None)
        return f"${name} unset"
    params[name] = args[1]
    return f"${name} = {args[1]}"


@meta_command(".models", ".models", "The current model and the ones tdbql can load.")
def _models(state: ShellState, args: list[str]) -> str:
    _expect(args, 0, ".models")
    session = state.session
    if session.is_loaded:
        current = describe_model(session.loaded.info(), session.settings)
    else:
        current = f"model {session.model_name} (loads on first use)"
    lines = [f"current: {current}", "", "load with: model NAME", "  default            the embedded model"]
    lines += [f"  {name:<18} {where}" for name, where in known_models()]
    lines.append("  PATH               a local Hugging Face folder (config.json, *.safetensors, tokenizer.json)")
    return "\n".join(lines)


def known_models() -> list[tuple[str, str]]:
    """Registry names the loader resolves to hub ids (loaded from the local cache or the hub)."""
    return sorted(catalog.REGISTRY_NAMES.items())


@meta_command(".scalars", ".scalars", "The scalar catalog.")
def _scalars(state: ShellState, args: list[str]) -> str:
    _expect(args, 0, ".scalars")
    return "\n".join(f"{s.name:<18} {s.help}; of {', '.join(s.applies_to)}" for s in catalog.SCALARS.values())


@meta_command(".prompts", ".prompts", "The prompt set and the session target.")
def _prompts(state: ShellState, args: list[str]) -> str:
    _expect(args, 0, ".prompts")
    session = state.session
    loss = describe_loss(session.loss) if session.loss else "none (set one with: target \" Mary\" vs \" John\")"
    if not session.prompts:
        return f"no prompts\ntarget: {loss}"
    table = pa.table({
        "prompt_id": [p.prompt_id for p in session.prompts],
        "text": [p.text for p in session.prompts],
        "target": [p.target for p in session.prompts],
        "distractor": [p.distractor for p in session.prompts],
    })
    return format_table(table, "table", max_rows=state.max_rows, width=state.width) + f"\ntarget: {loss}"


@meta_command(".plot", ".plot [TABLE] [--kind K] [--value COL] [--to FILE]",
              "Draw a table (default _) to a PNG: attention, layers or bars.")
def _plot(state: ShellState, args: list[str]) -> str:
    _refuse_files_when_safe(state, ".plot")
    from .plot import plot_table

    options = _plot_options(args)
    name = options.get("table", "_")
    if name not in state.session.table_names():
        raise TdbqlError(f"no table '{name}' to plot")
    table = state.session.con.sql(f"SELECT * FROM {quote_ident(name)}").to_arrow_table()
    path = Path(options.get("to", f"{'last' if name == '_' else name}.png")).expanduser()
    kind = plot_table(table, path, kind=options.get("kind"), value=options.get("value"), title=name)
    state.last_plot = path
    return f"wrote {path} ({kind})"


def _plot_options(args: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if word in ("--kind", "--value", "--to"):
            if i + 1 >= len(args):
                raise TdbqlError(f"{word} needs a value")
            options[word[2:]] = args[i + 1]
            i += 2
        elif word.startswith("--"):
            raise TdbqlError(f"unknown option {word} (options: --kind, --value, --to)")
        elif "table" not in options:
            options["table"] = word
            i += 1
        else:
            raise TdbqlError("usage: .plot [TABLE] [--kind K] [--value COL] [--to FILE]")
    return options

