"""`tdbql run`: a query file over a prompts dataset.

    tdbql run -f query.tql --prompts 'data/*.parquet' --out results/ [--engine local|ray]
              [--address ray://HOST:PORT] [--workers N] [--gpus-per-worker 1] [--db x.duckdb]

Exit codes as `tdbql`'s: 0 ok, 1 an error (stderr: what, and which shards are kept), 2 usage,
130 interrupted (committed shards are kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import sys
import time

from ...query.catalog import DTYPES
from ...query.errors import TdbqlError
from ..text import render_error
from .driver import DEFAULT_SHARD_ROWS, ENGINES, ON_ERROR, RunOptions, print_summary, run_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdbql run",
        description="Run a query file over a prompts dataset (Parquet, JSONL or CSV files), sharded and "
                    "resumable; results are Parquet per table plus manifest.json.")
    parser.add_argument("-f", "--file", required=True, metavar="FILE",
                        help="the run file: model/sae/target/set statements, then queries")
    parser.add_argument("--prompts", required=True, metavar="GLOB|FOLDER|FILE",
                        help="the dataset: columns prompt (or text), target, distractor, corrupt, and any others")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="where results and the manifest go")
    parser.add_argument("--engine", default="local", choices=ENGINES, help="local (this process) or ray")
    parser.add_argument("--address", metavar="ADDR", help="a Ray cluster (ray://HOST:PORT); default: a local Ray")
    parser.add_argument("--workers", type=_positive_int, metavar="N",
                        help="Ray actors (default: one per core, or per GPU with --gpus-per-worker)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="N")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="N",
                        help="GPUs per Ray actor (the model runs on cuda there)")
    parser.add_argument("--shard-rows", type=_positive_int, default=DEFAULT_SHARD_ROWS, metavar="N",
                        help=f"prompts per shard, the unit committed and resumed (default {DEFAULT_SHARD_ROWS})")
    parser.add_argument("--batch-size", type=_positive_int, metavar="N",
                        help="prompts per batch (default: auto; give it for results identical across engines)")
    parser.add_argument("--on-error", default="stop", choices=ON_ERROR,
                        help="a malformed row stops the run (default), or is skipped and listed")
    parser.add_argument("--model", default="default", metavar="NAME|PATH")
    parser.add_argument("--device", metavar="DEVICE", help="default: cpu, or cuda with --gpus-per-worker")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("-D", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="define $NAME in the run file (repeatable)")
    parser.add_argument("--db", metavar="PATH", help="then attach the results to this DuckDB file (views)")
    parser.add_argument("--explain", action="store_true", help="show the run's plan and stop")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def options_from(args, parser: argparse.ArgumentParser) -> RunOptions:
    params = {}
    for item in args.params:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"-D expects NAME=VALUE, got {item!r}")
        params[name] = value
    return RunOptions(query_file=args.file, prompts=args.prompts, out=args.out, engine=args.engine,
                      address=args.address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                      gpus_per_worker=args.gpus_per_worker, shard_rows=args.shard_rows, batch_size=args.batch_size,
                      model=args.model, device=args.device, dtype=args.dtype, on_error=args.on_error, params=params)


class RunProgress:
    """Prompts done of all, prompts/s and an ETA on stderr (a terminal only), per shard."""

    def __init__(self, enabled: bool, console=None) -> None:  # console: rich's, default stderr
        self.enabled, self.bar, self.task, self.first, self.started = enabled, None, None, None, time.monotonic()
        self.console = console

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress("prompts", BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                TextColumn("ETA"), TimeRemainingColumn(), console=self.console or Console(stderr=True),
                                transient=True)
            self.bar.start()
            self.first = done
            self.task = self.bar.add_task("prompts", total=total, completed=done, rate="")
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.update(self.task, completed=done, rate=f"{(done - self.first) / elapsed:,.1f} prompts/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = options_from(args, parser)
    try:
        if args.explain:
            from .explain import explain_run

            print(explain_run(options))
            return 0
        progress = RunProgress(enabled=sys.stderr.isatty())
        options.progress = progress
        try:
            summary = run_dataset(options)
        finally:
            progress.close()
        print_summary(summary)
        if args.db:
            from ..session import Session
            from .attach import attach_run

            session = Session(db=args.db)
            try:
                print(attach_run(session.con, args.out), file=sys.stderr)
            finally:
                session.close()
    except TdbqlError as err:
        if args.debug:
            import traceback

            traceback.print_exception(err)
        print(render_error(err), file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted: committed shards are kept; the same command resumes", file=sys.stderr)
        return 130
    return 0
