"""The `tdbql` command.

    tdbql                          open the REPL (or run stdin when it is not a terminal)
    tdbql -c "topk 5 act"          run statements and exit
    tdbql -f setup.tql -f q.tql    run files in order (-c and -f may be mixed; they run in the order given)
    tdbql --db runs.duckdb ...     keep tables in a file
    tdbql run -f q.tql --prompts 'data/*.parquet' --out results/   a dataset run (shell/run/cli.py)

Exit codes: 0 ok, 1 query error (stderr: `file:line:col: message`), 2 usage error, 130 interrupted.
No traceback unless --debug.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..query.catalog import DTYPES
from ..query.errors import TdbqlError
from .commands import write_page
from .format import FORMATS, HUMAN_FORMATS, MAX_ROWS_LIMIT, ProgressBar
from .meta import ShellState, emit, read_script_file, run_items
from .output import open_sink
from .session import Session
from .text import render_error

COMMAND_SOURCE = "<command>"
STDIN_SOURCE = "<stdin>"


class _AppendScript(argparse.Action):
    """-c and -f share one ordered list of (kind, value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        scripts = list(getattr(namespace, self.dest) or [])
        scripts.append((option_string.lstrip("-")[0], values))
        setattr(namespace, self.dest, scripts)


def package_version() -> str:
    try:
        return version("tdbql")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdbql",
        description="Query transformer internals: tdbql statements and SQL over DuckDB.",
        epilog="With no -c/-f, opens the interactive shell (or reads statements from stdin when piped). "
               "`tdbql run --help`: a query file over a prompts dataset.",
    )
    parser.add_argument("-c", "--command", dest="scripts", action=_AppendScript, metavar="STATEMENTS",
                        help="run statements and exit (repeatable)")
    parser.add_argument("-f", "--file", dest="scripts", action=_AppendScript, metavar="FILE",
                        help="run a .tql file and exit (repeatable)")
    parser.add_argument("--db", metavar="PATH", help="DuckDB file to keep tables in (default: in memory)")
    parser.add_argument("--model", default="default", metavar="NAME|PATH",
                        help="model to load on first use (default: the embedded model)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--batch-size", type=_positive_int, metavar="N", help="prompts per batch (default: auto)")
    parser.add_argument("--compile", action="store_true",
                        help="run node queries through torch.compile (fast on repeated shapes; compiles first)")
    parser.add_argument("-D", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="define $NAME for the statements (repeatable)")
    parser.add_argument("--format", default="table", choices=FORMATS,
                        help="result format (default: table); with another one, stdout holds only the data and "
                             "status lines go to stderr; parquet only with -o")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write results to FILE (.csv, .json, .jsonl, .parquet, .md pick the format)")
    parser.add_argument("--max-rows", type=_row_count, metavar="N",
                        help="rows shown per table in the table and line formats (default: 40)")
    parser.add_argument("--safe", action="store_true",
                        help="for scripts you did not write: no file or network access from SQL (DuckDB "
                             "enable_external_access=false), no prompt files, no model or autoencoder "
                             "paths, no .read/.output/.plot/.html")
    parser.add_argument("--html", metavar="FILE.html",
                        help="after a -c/-f/stdin run, write the last result as a self-contained HTML page "
                             "(as .html does: a route graph, attention heatmaps or a sortable table)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"tdbql {package_version()}")
    return parser


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _row_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_ROWS_LIMIT:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_ROWS_LIMIT}, got {text!r}")
    return value


def parse_params(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"-D expects NAME=VALUE, got {item!r}")
        params[name] = value
    return params


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # `tdbql run`: a query file over a prompts dataset (shell/run/)
        from .run.cli import main as run_main

        return run_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    params = parse_params(parser, args.params)
    interactive = not args.scripts and sys.stdin.isatty()
    if interactive and args.html:
        parser.error("--html writes the last result of a -c, -f or stdin run; in the shell, use .html")
    try:
        session = Session(model=args.model, db=args.db, device=args.device, dtype=args.dtype, safe=args.safe,
                          params=params, batch_size=args.batch_size, compile=args.compile,
                          progress=ProgressBar(enabled=sys.stderr.isatty()), notify=_status_on_terminal())
    except TdbqlError as err:
        return report(err, args.debug)
    try:
        if interactive:
            from .repl import run_repl

            return run_repl(session, mode=args.format, debug=args.debug, output=args.output)
        return run_scripts(session, _scripts(args), args)
    finally:
        session.close()


def _scripts(args) -> list[tuple[str, str]]:
    if args.scripts:
        return args.scripts
    return [("stdin", sys.stdin.read())]


def _status_on_terminal():
    """Status lines while work runs (a slow model load), on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return None
    return lambda line: print(line, file=sys.stderr, flush=True)


def run_scripts(session: Session, scripts: list[tuple[str, str]], args) -> int:
    """Run -c/-f/stdin scripts in order, meta-command lines included (`.param`, `.mode`,
    `.output`, `.plot`, ...); stop at the first error (exit 1) or at `.quit`."""
    max_rows = args.max_rows or (40 if args.format in HUMAN_FORMATS else None)
    state = ShellState(session=session, mode=args.format, max_rows=max_rows, pager=False)
    try:
        if args.output:
            state.output = open_sink(Path(args.output).expanduser())
        for kind, value in scripts:
            text, source = _script_text(kind, value)
            for shown in run_items(state, text, source, confirm_settings=False):
                emit(state, shown)
            if state.quit:
                break
        if args.html:
            emit(state, write_page(state, "_", args.html))
    except TdbqlError as err:
        return report(err, args.debug)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if isinstance(session.progress, ProgressBar):
            session.progress.close()
    return 0


def _script_text(kind: str, value: str) -> tuple[str, str]:
    if kind == "c":
        return value, COMMAND_SOURCE
    if kind == "stdin":
        return value, STDIN_SOURCE
    return read_script_file(Path(value)), value


def report(err: TdbqlError, debug: bool) -> int:
    if debug:
        traceback.print_exception(err)
    print(render_error(err), file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
