"""A run's results in DuckDB: one view per table over its Parquet files (`.attach OUT`, or
`tdbql run ... --db x.duckdb`), so the SQL after a dataset run is the SQL after a session's.

Result tables keep their names (`q1`, `top`, `route_edges`, ...) and replace a view of the same
name (a second attach of the folder); a base table of that name is left alone and is an error.
The prompt set becomes `prompts`, `tokens` and `corrupt_tokens` when the database has no prompt
set of its own; otherwise `run_prompts`, `run_tokens` and `run_corrupt_tokens`, and the message
says so (a session's own `prompts` table is kept: it holds the session's prompt set). Views name
the files by absolute path, so the database keeps working from any folder, as long as the run
folder stays where it is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from ...query.errors import TdbqlError
from ..prompts import resolve_path
from ..tables import transaction
from ..text import quote_ident
from .shards import MANIFEST, Manifest

PROMPT_TABLES = ("prompts", "tokens", "corrupt_tokens")
# `attach 'results/'` or `attach results/`: no alias, no options (those are DuckDB's own ATTACH)
_PLAIN_ATTACH = re.compile(r"\s*attach\s+(?:database\s+)?('(?:[^']|'')*'|[^\s;'()]+)\s*;?\s*", re.IGNORECASE)


def _objects(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    rel = con.execute("SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main'")
    return {name: kind for name, kind in rel.fetchall()}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def attach_statement(con: duckdb.DuckDBPyConnection, sql: str, source_name: str | None, *,
                     joined: bool = False) -> str | None:
    """`attach 'results/'` as a statement: when it names a folder (which DuckDB's ATTACH cannot
    open: its databases are files), attach it as a run; None leaves the statement to DuckDB."""
    match = _PLAIN_ATTACH.fullmatch(sql)
    if match is None:
        return None
    name = match.group(1)
    name = name[1:-1].replace("''", "'") if name.startswith("'") else name
    folder = resolve_path(name, source_name)
    return attach_run(con, folder, joined=joined) if os.path.isdir(folder) else None  # os.path: never raises


def attach_run(con: duckdb.DuckDBPyConnection, folder: str | Path, *, joined: bool = False) -> str:
    """Create the views; returns what was attached, one line."""
    folder = Path(folder).expanduser()
    manifest = Manifest.load(folder)
    if manifest is None:
        raise TdbqlError(f"'{folder}' is not a tdbql run folder (no {MANIFEST})")
    if not manifest.data.get("complete"):
        done = len(manifest.shards)
        raise TdbqlError(f"the run in '{folder}' is not complete ({done} shards committed); run the same "
                         "`tdbql run` command again to finish it")
    objects = _objects(con)
    own_prompts = any(objects.get(name) == "BASE TABLE" for name in PROMPT_TABLES)
    views: dict[str, tuple[str, list[str]]] = {}
    for name, info in manifest.tables.items():
        files = [str((folder / f).resolve()) for f in info.get("files", ())]
        if not files:
            continue
        view = f"run_{name}" if name in PROMPT_TABLES and own_prompts else name
        if objects.get(view) == "BASE TABLE":
            raise TdbqlError(f"the database has a table {view}; drop or rename it to attach the run's {name}")
        views[view] = (name, files)
    with transaction(con, joined):
        for view, (_, files) in views.items():
            listed = ", ".join(_literal(f) for f in files)
            con.execute(f"CREATE OR REPLACE VIEW {quote_ident(view)} AS "
                        f"SELECT * FROM read_parquet([{listed}], union_by_name = true)")
    shown = ", ".join(f"{view} ({manifest.tables[name].get('rows', 0):,} rows)" for view, (name, _) in views.items())
    note = " (the database keeps its own prompt set; the run's is run_prompts)" if own_prompts else ""
    return f"attached {len(views)} views from {folder}: {shown}{note}"
