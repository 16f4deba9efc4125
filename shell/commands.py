"""The meta-commands themselves (registered in `registry.py`, run by `meta.py`)."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import pyarrow as pa

from ..query import catalog
from ..query.errors import TdbqlError
from .format import FORMATS, MAX_ROWS_LIMIT
from .output import ShellState, Shown, open_sink
from .plot import plot_table
from .prompts import describe_loss
from .registry import REGISTRY, ScriptRun, commands, meta_command
from .text import describe_model, quote_ident

SWITCHES = "on|off"


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


def _file(state: ShellState, args: list[str], usage: str, what: str) -> Path:
    if len(args) != 1:
        raise TdbqlError(f"usage: {usage}")
    _refuse_files_when_safe(state, what)
    return Path(args[0]).expanduser()


# --- help, quit --------------------------------------------------------------------------------------


@meta_command(".help", ".help [COMMAND]", "Show this list, or one command.", aliases=("\\?", "help"),
              arguments=("command",))
def _help(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".help [COMMAND]")
    if args:
        name = args[0] if args[0] in REGISTRY else "." + args[0].lstrip(".")
        if name not in REGISTRY:
            raise TdbqlError(f"no command '{args[0]}' (.help lists them)")
        chosen = [REGISTRY[name]]
    else:
        chosen = commands()
    lines = []
    for command in chosen:
        aliases = f" (also {', '.join(command.aliases)})" if command.aliases else ""
        lines.append(f"{command.usage:<40} {command.help}{aliases}")
    if not args:
        lines += ["", "Enter runs the input unless it is unfinished: an open string or parenthesis, or SQL",
                  "without its closing ';'. Esc Enter runs it anyway. On a meta-command line, `--word` is an",
                  "option and `-- ` (dashes, then a space) starts a comment."]
    return "\n".join(lines)


@meta_command(".quit", ".quit", "Leave tdbql (also Ctrl-D).", aliases=(".exit", ".q", "\\q"))
def _quit(state: ShellState, args: list[str]) -> str:
    state.quit = True
    return ""


# --- tables ------------------------------------------------------------------------------------------


@meta_command(".tables", ".tables", "List tables and views.", aliases=("\\dt",))
def _tables(state: ShellState, args: list[str]) -> str:
    _expect(args, 0, ".tables")
    return "\n".join(state.session.table_names())


@meta_command(".schema", ".schema [TABLE]", "Show the columns of one table or all.", aliases=("\\d",),
              arguments=("table",))
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


@meta_command(".prompts", ".prompts", "The prompt set and the session target.")
def _prompts(state: ShellState, args: list[str]) -> Shown:
    _expect(args, 0, ".prompts")
    session = state.session
    loss = describe_loss(session.loss) if session.loss else "none (set one with: target \" Mary\" vs \" John\")"
    if not session.prompts:
        return Shown(data=f"no prompts\ntarget: {loss}")
    table = pa.table({
        "prompt_id": [p.prompt_id for p in session.prompts],
        "text": [p.text for p in session.prompts],
        "target": [p.target for p in session.prompts],
        "distractor": [p.distractor for p in session.prompts],
    })
    return Shown(table=table, data=f"target: {loss}")


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


# --- output ------------------------------------------------------------------------------------------


@meta_command(".mode", f".mode [{'|'.join(FORMATS)}]", "Show or set the output format.", setting=True,
              arguments=("|".join(FORMATS),))
def _mode(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".mode [FORMAT]")
    if args:
        if args[0] not in FORMATS:
            raise TdbqlError(f"unknown format '{args[0]}' (formats: {', '.join(FORMATS)})")
        state.mode = args[0]
    return f"mode {state.mode}"


@meta_command(".output", ".output [FILE]", "Write results to FILE (.csv, .json, .jsonl, .parquet, .md pick "
              "the format); no FILE: back to the screen.", aliases=(".o", "\\o"), setting=True, arguments=("file",))
def _output(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".output [FILE]")
    if not args:
        state.output = None
        return "output: stdout"
    path = _file(state, args, ".output FILE", ".output FILE")
    state.output = open_sink(path)
    return f"output: {path}"


@meta_command(".once", ".once FILE", "Write the next result only to FILE (the extension picks the format).",
              setting=True, arguments=("file",))
def _once(state: ShellState, args: list[str]) -> str:
    path = _file(state, args, ".once FILE", ".once")
    state.once = open_sink(path)
    return f"next result: {path}"


@meta_command(".read", ".read FILE", "Run the statements and meta-commands of a file.", aliases=("\\i",),
              arguments=("file",))
def _read(state: ShellState, args: list[str]) -> ScriptRun:
    return ScriptRun(_file(state, args, ".read FILE", ".read"))


@meta_command(".attach", ".attach FOLDER", "Attach a dataset run's results (tdbql run --out FOLDER): a view per "
              "table over its Parquet files.", aliases=(".open",), arguments=("file",))
def _attach(state: ShellState, args: list[str]) -> str:
    from .run.attach import attach_run  # a dataset run's folder (shell/run/)

    folder = _file(state, args, ".attach FOLDER", ".attach")
    return attach_run(state.session.con, folder, joined=state.session._user_transaction)


@meta_command(".timer", ".timer [on|off]", "Show how long each statement takes.", setting=True,
              arguments=(SWITCHES,))
def _timer(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".timer [on|off]")
    state.timer = _on_off(args, state.timer, ".timer [on|off]")
    return f"timer {'on' if state.timer else 'off'}"


@meta_command(".pager", ".pager [on|off]", "Page long tables with $PAGER (less -SRXF).", setting=True,
              arguments=(SWITCHES,))
def _pager(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".pager [on|off]")
    state.pager = _on_off(args, state.pager, ".pager [on|off]")
    return f"pager {'on' if state.pager else 'off'}"


@meta_command(".expanded", ".expanded [on|off|auto]", "Show tables one column per line (auto: when too wide).",
              aliases=("\\x",), setting=True, arguments=("on|off|auto",))
def _expanded(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".expanded [on|off|auto]")
    if not args:
        state.expanded = "off" if state.expanded == "on" else "on"
    elif args[0].lower() == "auto":
        state.expanded = "auto"
    else:
        state.expanded = "on" if _on_off(args, False, ".expanded [on|off|auto]") else "off"
    return f"expanded {state.expanded}"


@meta_command(".maxrows", ".maxrows [N|all]", "Rows shown per table in the table and line modes.", setting=True)
def _maxrows(state: ShellState, args: list[str]) -> str:
    _expect(args, 1, ".maxrows [N|all]")
    if args:
        state.max_rows = None if args[0].lower() == "all" else max_rows_value(args[0])
    return f"maxrows {state.max_rows or 'all'}"


def max_rows_value(text: str) -> int:
    """A row limit: an integer from 1 to MAX_ROWS_LIMIT."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_ROWS_LIMIT)) \
            or not 1 <= int(text) <= MAX_ROWS_LIMIT:
        raise TdbqlError(f"expected a row count from 1 to {MAX_ROWS_LIMIT} or all, not {text!r}")
    return int(text)


@meta_command(".param", ".param [NAME [VALUE]]", "Show or set $NAME (like -D NAME=VALUE); no VALUE: unset.",
              setting=True, fill_from=1)
def _param(state: ShellState, args: list[str]) -> str | Shown:
    params = state.session.params
    if not args:
        return Shown(data="\n".join(f"${name} = {value}" for name, value in sorted(params.items()))
                     or "no parameters")
    _expect(args, 2, ".param [NAME [VALUE]]")
    name = args[0].lstrip("$")
    if not name.isidentifier():
        raise TdbqlError(f"parameter names are identifiers, not {args[0]!r}")
    if len(args) == 1:
        params.pop(name, None)
        return f"${name} unset"
    params[name] = args[1]
    return f"${name} = {args[1]}"


# --- plots -------------------------------------------------------------------------------------------

PLOT_USAGE = ".plot [TABLE] [--kind K] [--value COL] [--to FILE]"


@meta_command(".plot", PLOT_USAGE, "Draw a table (default _) to a PNG; the table's kind picks the picture.",
              arguments=("table",))
def _plot(state: ShellState, args: list[str]) -> Shown:
    _refuse_files_when_safe(state, ".plot")
    options = plot_options(args)
    name = options.get("table", "_")
    if name not in state.session.table_names():
        raise TdbqlError(f"no table '{name}' to plot")
    table = state.session.con.sql(f"SELECT * FROM {quote_ident(name)}").to_arrow_table()
    path = Path(options.get("to", f"{'last' if name == '_' else name}.png")).expanduser()
    drawn = plot_table(table, path, kind=options.get("kind"), value=options.get("value"), title=name,
                       input_tokens=_input_tokens(state))
    state.last_plot = path
    return Shown(status=f"wrote {path} ({drawn})")


def _input_tokens(state: ShellState) -> dict[tuple[int, int], str]:
    """(prompt_id, position) -> the prompt's token there, for axes labelled by the input."""
    if "tokens" not in state.session.table_names():
        return {}
    rows = state.session.con.sql("SELECT prompt_id, position, token FROM tokens").fetchall()
    return {(p, t): token for p, t, token in rows}


# --- pages -------------------------------------------------------------------------------------------

HTML_USAGE = ".html [TABLE] [FILE.html]"


@meta_command(".html", HTML_USAGE, "Write a table (default _) as one self-contained HTML page: a route graph, "
              "attention heatmaps or a sortable table; no FILE in the REPL: open it in the browser.",
              arguments=("table", "file"))
def _html(state: ShellState, args: list[str]) -> Shown:
    return write_page(state, *html_arguments(args))


def write_page(state: ShellState, name: str, file: str | None) -> Shown:
    """`.html` and `tdbql --html FILE`: table `name`'s page to `file` (default NAME.html)."""
    from .pages import write_html  # imports the executor's schemas: only when a page is written

    _refuse_files_when_safe(state, ".html")
    path = Path(file or f"{'last' if name == '_' else name}.html").expanduser()
    drawn = write_html(state.session, name, path)
    opened = file is None and state.open_pages and open_in_browser(path)
    return Shown(status=f"wrote {path} ({drawn})" + ("; opened in the browser" if opened else ""))


def html_arguments(args: list[str]) -> tuple[str, str | None]:
    """(table, file): a lone argument ending in .html/.htm is the file."""
    _expect(args, 2, HTML_USAGE)
    if len(args) == 2:
        return args[0], args[1]
    if args and Path(args[0]).suffix.lower() in (".html", ".htm"):
        return "_", args[0]
    return (args[0] if args else "_"), None


def open_in_browser(path: Path) -> bool:
    """Open a page in the default graphical browser, if there is one (a console browser such as
    lynx would take over the terminal, so it does not count)."""
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return False
    return type(browser) is not webbrowser.GenericBrowser and browser.open(path.resolve().as_uri())


def plot_options(args: list[str]) -> dict[str, str]:
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
            raise TdbqlError(f"usage: {PLOT_USAGE}")
    return options
