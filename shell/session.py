"""A tdbql session: one model, one DuckDB connection, one prompt set, one default loss.

`Session.execute(text)` parses a program and runs its statements in order (parse -> bind -> engine
-> DuckDB); it knows nothing about terminals (pgcli's `pgexecute.py` role). Tables it keeps
(docs/language.md): `prompts`, `tokens`, `queries` (a provenance row per model query), a table per
model query (`as name`, else q1, q2, ...; routes give `route_nodes`/`route_edges`), the view `_`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import duckdb
import pyarrow as pa

from ..grammar.parse import parse
from ..query.bind import bind, bind_query, needs_model
from ..query.checks import Checks, parse_size
from ..query.context import NOTE_KEY, ModelInfo, PromptRow
from ..query.errors import TdbqlError
from ..query.plan import (
    QUERY_TYPES,
    BoundQuery,
    ExplainStmt,
    Loss,
    ModelStmt,
    PromptsFromFile,
    PromptsFromSql,
    PromptStmt,
    RoutesQuery,
    SaeStmt,
    SetStmt,
    Span,
    SqlStmt,
    TargetStmt,
)
from .announce import NotifyFn, announced
from .prompts import (
    describe_loss,
    prompt_rows,
    prompts_from_arrow,
    prompts_table,
    read_prompt_file,
    resolve_path,
    tokens_table,
)
from .tables import (
    PROMPT_TABLES,
    QUERIES_DDL,
    check_result_name,
    ensure_queries,
    next_query_id,
    query_record,
    save_result,
    store_all,
    table_names,
)
from .text import (
    SQL_ROW_COUNT_WORDS,
    SQL_ROW_RESULT_WORDS,
    describe_model,
    duckdb_message,
    first_word,
    is_interrupt,
    locate,
    parse_prefix,
    substitute_params,
    with_source,
)

ProgressFn = Callable[[int, int], None]


@dataclass
class StatementResult:
    """What one statement produced: a table (shown), a message, or both."""

    statement: Any
    span: Span
    text: str
    table: pa.Table | None = None
    table_name: str | None = None
    message: str | None = None
    elapsed_ms: float = 0.0


@dataclass
class Settings:
    """Values changed with `set name = value`."""

    batch_size: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    freeze_ln_f: bool = True  # detach the final layer-norm scale in backward passes (TDB's choice)
    compile: bool = False  # node queries through torch.compile (executor/compiled.py)
    memory_limit: int | None = None  # bytes a query may add; None: what the machine has left


class Session:
    """Owns the loaded model (loaded lazily), the DuckDB connection, the prompts and the loss.

    `db` None is an in-memory database; a path is a DuckDB file that keeps tables (and the prompt
    set) between sessions. `params` fill `$name` in statements; `progress(done, total)` is called
    per batch; `notify(line)` gets status lines while work runs (a model load over half a second:
    "loading model ..." when it passes that mark, then its time); `safe` turns off DuckDB's file and
    network access.
    """

    def __init__(self, model: str = "default", db: str | None = None, *, device: str = "cpu",
                 dtype: str = "fp32", safe: bool = False, params: dict[str, str] | None = None,
                 progress: ProgressFn | None = None, batch_size: int | None = None,
                 compile: bool = False, notify: NotifyFn | None = None) -> None:
        self.model_name = self.cli_model = model  # --model: the user's own choice, allowed under --safe
        self.db = db
        self.safe = safe
        self.params = dict(params or {})
        self.progress = progress
        self.notify = notify
        self.settings = Settings(batch_size=batch_size, device=device, dtype=dtype, compile=compile)
        self.prompts: list[PromptRow] = []
        self.loss: Loss | None = None
        self._loaded = None
        self._user_transaction = False  # a `begin` of the user's is open (our writes join it)
        self._lengths: set[int] = set()  # the prompts' token counts (the prompt tables hold them)
        self._engine_cache: tuple | None = None  # (key, Engine), see _engine
        self.con = self._connect()
        self._restore_prompts()

    # --- connection and tables -------------------------------------------------------------

    def _connect(self) -> duckdb.DuckDBPyConnection:
        try:
            con = duckdb.connect(self.db or ":memory:")
        except duckdb.Error as exc:
            raise TdbqlError(f"cannot open database '{self.db}': {exc}") from exc
        try:
            con.execute(QUERIES_DDL)
        except duckdb.Error:  # the name holds a view or another object: ensure_queries explains it later
            pass
        if self.safe:
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        return con

    def close(self) -> None:
        self.con.close()

    def table_names(self) -> list[str]:
        """Tables and views of the main schema, sorted."""
        return table_names(self.con)

    def columns(self) -> dict[str, list[str]]:
        """Column names of every table and view, in order."""
        rel = self.con.sql(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
        )
        out: dict[str, list[str]] = {}
        for table, column in rel.fetchall():
            out.setdefault(table, []).append(column)
        return out

    def _restore_prompts(self) -> None:
        """A file database remembers its prompt set across sessions. A `prompts` table the user
        changed into something else does not stop the session from opening: it starts without
        prompts, and says why when a query needs them."""
        self._restore_error = None
        if "prompts" not in self.table_names():
            return
        try:
            table = self.con.sql("SELECT * FROM prompts ORDER BY prompt_id").to_arrow_table()
            if table.num_rows:
                self.prompts = prompts_from_arrow(table, source="table prompts")
        except (duckdb.Error, TdbqlError) as err:
            reason = duckdb_message(err) if isinstance(err, duckdb.Error) else err.message
            self._restore_error = f"table prompts of {self.db} could not be read as a prompt set: {reason}"

    # --- model ---------------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    @property
    def loaded(self):
        """The LoadedModel, loaded on first use."""
        if self._loaded is None:
            self._load(self.model_name)
        return self._loaded

    def _load(self, name: str, *, dtype: str | None = None, device: str | None = None) -> None:
        """Load `name`; the settings change only once the model has loaded. The executor (and
        torch) is imported here, on first use, so that a session of SQL alone starts fast."""
        from ..executor.engine import use_threads_for
        from ..executor.runtime.loading import load_model

        dtype, device = dtype or self.settings.dtype, device or self.settings.device
        with announced(self.notify, f"loading model {name} ({dtype}, {device}) ...", f"model {name} loaded"):
            self._loaded = load_model(name, dtype=dtype, device=device, offline=self.safe,
                                      local=not self.safe or name == self.cli_model)
        use_threads_for(self._loaded)
        self.model_name, self.settings.dtype, self.settings.device = name, dtype, device
        if self.prompts:
            self._write_prompt_tables(self.prompts)

    def info(self) -> ModelInfo:
        return self.loaded.info()

    # --- running text ----------------------------------------------------------------------

    def execute(self, text: str, *, source_name: str | None = None) -> list[StatementResult]:
        """Run every statement of `text`; the first error raises TdbqlError (earlier ones ran)."""
        return list(self.execute_iter(text, source_name=source_name))

    def execute_iter(self, text: str, *, source_name: str | None = None) -> Iterator[StatementResult]:
        """Like `execute`, yielding each result as soon as its statement has run.

        A syntax error first runs the complete statements before it, then raises. Errors carry
        `source_name` (for `file:line:col`) and, when they have no position, the statement's.
        """
        text = substitute_params(text, self.params)
        try:
            statements = parse(text)
        except TdbqlError as err:
            yield from self._run_statements(parse_prefix(text, err, parse), text, source_name)
            raise with_source(err, source_name, text)
        yield from self._run_statements(statements, text, source_name)

    def _run_statements(self, statements, text: str, source_name: str | None) -> Iterator[StatementResult]:
        for stmt, span in statements:
            try:
                yield self.run_statement(stmt, span, text, source_name=source_name)
            except TdbqlError as err:
                raise with_source(locate(err, span, text), source_name, text)
            except Exception as exc:
                if is_interrupt(exc):  # Ctrl-C inside DuckDB: the caller cancels, as for any Ctrl-C
                    raise KeyboardInterrupt from exc
                raise self._wrap(exc, span, text, source_name) from exc

    @staticmethod
    def _wrap(exc: Exception, span: Span, text: str, source_name: str | None) -> TdbqlError:
        """One user-facing error for a failure the statement did not report itself."""
        if isinstance(exc, duckdb.Error):
            # DuckDB's message carries its own caret (LINE n: ...), so no second source line here
            err = TdbqlError(f"SQL error: {duckdb_message(exc)}", line=span.line, column=span.column)
        else:  # a bug or a torch/OS failure: one line, traceback only with --debug
            err = TdbqlError(f"internal error: {type(exc).__name__}: {exc}", line=span.line, column=span.column,
                             source=text)
        return with_source(err, source_name, text)

    def run_statement(self, stmt, span: Span, text: str, *, source_name: str | None = None) -> StatementResult:
        """Bind one parsed statement and run it."""
        started = time.perf_counter()
        stmt = self._bind(stmt, span, text)
        stmt_text = text[span.start_pos:span.end_pos]
        result = self._dispatch(stmt, span, stmt_text, source_name)
        result.elapsed_ms = (time.perf_counter() - started) * 1000
        return result

    def _bind(self, stmt, span: Span, text: str):
        """The binder's checks (query/bind.py); model queries come back as a BoundQuery with the
        loss they use, explain's query too."""
        if not needs_model(stmt):
            return bind(stmt, span, source=text)
        loaded = self.loaded
        stmt = bind(stmt, span, info=loaded.info(), tokenize=loaded.encode, tables=self.table_names(), source=text,
                    dtype=self.settings.dtype)
        if isinstance(stmt, ExplainStmt):
            return self._bind_query(stmt.query, span, text, explain=True)
        if isinstance(stmt, QUERY_TYPES):
            return self._bind_query(stmt, span, text)
        return stmt

    def run_unsaved(self, text: str) -> pa.Table:
        """One model query's result table, keeping nothing (no table, no `queries` row)."""
        [(statement, span)] = parse(text)
        return self._engine().run(self._bind(statement, span, text), self.prompts)["result"]

    def _bind_query(self, query, span: Span, text: str, explain: bool = False) -> BoundQuery:
        if not self.prompts:
            why = f" ({self._restore_error})" if self._restore_error else ""
            raise TdbqlError(f'no prompts yet: add one with prompt "..." or prompts from \'file.jsonl\'{why}')
        bound = bind_query(query, span, session_loss=self.loss, source=text, explain=explain,
                           prompts_have_targets=all(p.target for p in self.prompts),
                           prompts_have_pairs=all(p.corrupt is not None for p in self.prompts))
        Checks(None, None, (), span, text).positions(getattr(query, "where", ()), self._lengths, len(self.prompts))
        return bound

    def _dispatch(self, stmt, span: Span, text: str, source_name: str | None) -> StatementResult:
        handlers = {
            ModelStmt: self._run_model,
            SaeStmt: self._run_sae,
            PromptStmt: self._run_prompt,
            PromptsFromFile: self._run_prompts_file,
            PromptsFromSql: self._run_prompts_sql,
            TargetStmt: self._run_target,
            SetStmt: self._run_set,
            SqlStmt: self._run_sql,
        }
        result = StatementResult(statement=stmt, span=span, text=text)
        if isinstance(stmt, BoundQuery):
            result.statement = stmt.query
            return self._run_explain(stmt, result) if stmt.explain else self._run_query(stmt, result)
        return handlers[type(stmt)](stmt, result, source_name)

    # --- statements ------------------------------------------------------------------------

    def _run_model(self, stmt: ModelStmt, result: StatementResult, source_name) -> StatementResult:
        name = stmt.name
        if name != "default" and not self.safe:  # `default` is always the embedded model (./default a folder)
            local = resolve_path(name, source_name)
            name = str(local) if os.path.exists(local) else name
        self._load(name, dtype=stmt.dtype or self.settings.dtype, device=stmt.device or self.settings.device)
        result.message = describe_model(self._loaded.info(), self.settings)
        return result

    def _run_sae(self, stmt: SaeStmt, result: StatementResult, source_name) -> StatementResult:
        if self.safe:  # one message whether the path exists or not
            raise TdbqlError("loading autoencoders from a local path is disabled in --safe mode")
        path = resolve_path(stmt.path, source_name)
        aes = self.loaded.load_sae(path, stmt.site)
        attached = [f"{ae.site}[{ae.layer}] ({ae.n_latents} latents)" for ae in aes]
        result.message = f"attached {len(attached)} autoencoder(s): {', '.join(attached)}"
        return result

    def _run_prompt(self, stmt: PromptStmt, result: StatementResult, source_name) -> StatementResult:
        return self._set_prompts(prompt_rows(stmt.texts, stmt.corrupts), result)

    def _run_prompts_file(self, stmt: PromptsFromFile, result: StatementResult, source_name) -> StatementResult:
        if self.safe:
            raise TdbqlError("reading prompt files is disabled in --safe mode")
        return self._set_prompts(read_prompt_file(resolve_path(stmt.path, source_name)), result)

    def _run_prompts_sql(self, stmt: PromptsFromSql, result: StatementResult, source_name) -> StatementResult:
        table = self.con.sql(stmt.sql).to_arrow_table()
        return self._set_prompts(prompts_from_arrow(table, source="the prompts query"), result)

    def set_prompts(self, rows: list[PromptRow]) -> None:
        """Replace the prompt set (and the prompts/tokens tables, which need the tokenizer)."""
        self._write_prompt_tables(rows)
        self.prompts = list(rows)

    def _set_prompts(self, rows: list[PromptRow], result: StatementResult) -> StatementResult:
        self.set_prompts(rows)
        result.table_name = "prompts"
        pairs = sum(p.corrupt is not None for p in rows)
        result.message = f"{len(rows)} prompt{'s' if len(rows) != 1 else ''}" + (
            f" ({pairs} with a corrupted prompt)" if pairs else "")
        return result

    def _write_prompt_tables(self, rows: list[PromptRow]) -> None:
        """The prompts, tokens and corrupt_tokens tables, written in one transaction (every prompt
        checked against the model's context first, as batching does)."""
        from ..executor.runtime.batching import encode_prompts

        loaded = self.loaded
        encoded = encode_prompts(loaded, rows)
        pairs = [p for p in rows if p.corrupt is not None]
        corrupt_ids = iter(encode_prompts(loaded, [p.model_copy(update={"text": p.corrupt}) for p in pairs],
                                          what="corrupt prompt"))
        corrupt_encoded = [next(corrupt_ids) if p.corrupt is not None else None for p in rows]
        self._lengths = {len(ids) for ids in encoded + corrupt_encoded if ids is not None}
        tables = {"prompts": prompts_table(rows, encoded, corrupt_encoded),
                  "tokens": tokens_table(rows, encoded, loaded.token_str),
                  "corrupt_tokens": tokens_table(rows, corrupt_encoded, loaded.token_str)}
        store_all(self.con, tables, joined=self._user_transaction)

    def _run_target(self, stmt: TargetStmt, result: StatementResult, source_name) -> StatementResult:
        self.loss = stmt.loss
        result.message = f"target: {describe_loss(stmt.loss)}"
        return result

    def _run_set(self, stmt: SetStmt, result: StatementResult, source_name) -> StatementResult:
        """A bound `set` (query/bind.py checked the name and the value)."""
        name, value = stmt.name, None if stmt.value == "auto" else stmt.value
        if name == "memory_limit":
            self.settings.memory_limit = None if value is None else parse_size(value)
        elif name in ("device", "dtype") and self._loaded is not None:
            self._load(self.model_name, **{name: value})
        else:
            setattr(self.settings, name, value)
        result.message = f"{name} = {'auto' if value is None else value}"
        return result

    def _run_explain(self, bound: BoundQuery, result: StatementResult) -> StatementResult:
        result.message = self._engine().explain(bound, self.prompts)
        return result

    def _run_sql(self, stmt: SqlStmt, result: StatementResult, source_name) -> StatementResult:
        if first_word(stmt.text) == "attach" and not self.safe:  # `attach 'results/'`: a dataset run's folder
            from .run.attach import attach_statement  # (imported here: it reads Parquet, a cold start need not)
            result.message = attach_statement(self.con, stmt.text, source_name, joined=self._user_transaction)
            if result.message is not None:
                return result
        rel = self.con.sql(stmt.text)
        self._track_transaction(first_word(stmt.text))
        if rel is None:
            result.message = "OK"
            return result
        table = rel.to_arrow_table()
        first = first_word(stmt.text)
        if first in SQL_ROW_RESULT_WORDS:
            result.table = table
        elif first in SQL_ROW_COUNT_WORDS and table.column_names == ["Count"] and table.num_rows == 1:
            n = table.column(0)[0].as_py()
            result.message = f"{n} row{'s' if n != 1 else ''}"
        else:
            result.message = "OK"
        return result

    def _track_transaction(self, word: str) -> None:
        if word == "begin":
            self._user_transaction = True
        elif word in ("commit", "rollback", "abort", "end"):
            self._user_transaction = False

    # --- model queries ---------------------------------------------------------------------

    def _engine(self):
        """The Engine for the current model, autoencoders and settings, reused across queries (it
        caches weight-derived tensors); rebuilt when any of them changes."""
        from ..executor.engine import Engine

        loaded = self.loaded
        # the autoencoder objects themselves (not ids): holding them keeps their ids from being reused
        settings = self.settings
        key = (loaded, tuple(loaded.saes.items()), settings.batch_size, self.progress, settings.freeze_ln_f,
               settings.compile, settings.memory_limit)
        if self._engine_cache is None or not _same_key(self._engine_cache[0], key):
            engine = Engine(loaded, batch_size=settings.batch_size, progress=self.progress,
                            freeze_ln_f=settings.freeze_ln_f, compile=settings.compile,
                            memory_limit=settings.memory_limit)
            self._engine_cache = (key, engine)
        return self._engine_cache[1]

    def _run_query(self, bound: BoundQuery, result: StatementResult) -> StatementResult:
        query = bound.query
        check_result_name(query.name)
        self._ensure_session_tables()
        started_at = datetime.now(timezone.utc).replace(tzinfo=None)
        t0 = time.perf_counter()
        tables = self._engine().run(bound, self.prompts)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        query_id = next_query_id(self.con)
        named = self._name_results(query, tables, query_id)
        shown_name, shown = _shown_table(named)
        record = query_record(query_id, result.text, query, self.model_name, started_at, elapsed_ms, shown.num_rows,
                              list(named))
        save_result(self.con, named, shown_name, record, joined=self._user_transaction)
        result.table, result.table_name = shown, shown_name
        if len(named) > 1:
            result.message = "tables: " + ", ".join(f"{n} ({t.num_rows} rows)" for n, t in named.items())
        note = (shown.schema.metadata or {}).get(NOTE_KEY)
        if note:
            result.message = note.decode()
        return result

    def _ensure_session_tables(self) -> None:
        """`queries` and the prompt set's tables back if a user dropped them (before the query runs)."""
        ensure_queries(self.con)
        if self.prompts and not set(PROMPT_TABLES) <= set(self.table_names()):
            self._write_prompt_tables(self.prompts)

    def _name_results(self, query, tables: dict[str, pa.Table], query_id: int) -> dict[str, pa.Table]:
        if isinstance(query, RoutesQuery):
            prefix = query.name or "route"
            return {f"{prefix}_{key.removeprefix('route_')}": t for key, t in tables.items()}
        name = query.name or self._free_default_name(query_id)
        return {name: tables["result"]}

    def _free_default_name(self, query_id: int) -> str:
        existing = set(self.table_names())
        n = query_id
        while f"q{n}" in existing:
            n += 1
        return f"q{n}"

# --- helpers (pure) ------------------------------------------------------------------------------


def _same_key(a: tuple, b: tuple) -> bool:
    """Engine cache keys: the model and autoencoders by identity, settings by value."""
    (loaded_a, saes_a, *settings_a), (loaded_b, saes_b, *settings_b) = a, b
    same_saes = len(saes_a) == len(saes_b) and all(
        ka == kb and ae_a is ae_b for (ka, ae_a), (kb, ae_b) in zip(saes_a, saes_b))
    return loaded_a is loaded_b and same_saes and settings_a == settings_b


def _shown_table(named: dict[str, pa.Table]) -> tuple[str, pa.Table]:
    """The table a statement shows (and `_` points at): the edges of a route graph, else the one table."""
    for name, table in named.items():
        if name.endswith("_edges"):
            return name, table
    return next(iter(named.items()))
