"""One shard, start to commit: the function both engines run (local.py in the process,
ray_engine.py in each actor of a Ray Data actor pool).

A `ShardRunner` is built once per worker: it loads the model through a `Session` (in-memory
DuckDB), runs the file's setup statements (`model`, `sae`, `target`, `set`) and binds its
queries. `run_shard` then reads the shard's rows, sets aside the malformed ones (`--on-error
skip`) or stops at the first (`stop`), sets the prompt set, runs each query (what it keeps
depends on how its table merges: queries.py) and commits the shard's files (shards.Staged). It
returns the shard's receipt, which the driver records in the manifest.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from ...executor.blocks import node_blocks
from ...executor.conditions import token_conditions_relative
from ...executor.engine import paired_rows
from ...executor.reduce import OverPromptsSink
from ...executor.runtime.batching import batches, encode_prompts
from ...query.bind import bind, bind_query
from ...query.context import PromptRow
from ...query.errors import TdbqlError
from ...query.plan import BoundQuery, PatchingQuery
from ..session import Session
from ..text import locate, with_source
from .dataset import DataFile, RawRow, extra_schema, extras_table, read_range
from .merge import positions_from_end, sink_state
from .queries import read_run_file
from .shards import Shard, Staged, mark_attempt, partial_file, pieces, table_file

PROMPT_TABLE_ORDER = {"prompts": "prompt_id", "tokens": "prompt_id, position", "corrupt_tokens": "prompt_id, position"}
FAULT_ENV = "TDBQL_RUN_FAULT"  # tests: `kill:SHARD` ends the worker's process half way through that shard's
# first commit (after its first file is renamed into place), as a killed worker would


@dataclass
class RunConfig:
    """Everything a worker needs, as plain data (it travels to Ray actors)."""

    out: str
    query_text: str  # the run file, parameters filled in
    query_file: str | None
    files: list[dict]  # DataFile.to_dict() of each dataset file
    has_corrupt: bool
    model: str = "default"
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int | None = None
    on_error: str = "stop"  # skip | stop
    run_id: str = ""
    fault: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ShardRunner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.files = [DataFile.from_dict(f) for f in config.files]
        self.run_file = read_run_file(config.query_text, config.query_file, has_corrupt=config.has_corrupt)
        self.session = Session(model=config.model, device=config.device, dtype=config.dtype,
                               batch_size=config.batch_size)
        text = config.query_text
        for stmt, span in self.run_file.setup:
            self._located(lambda: self.session.run_statement(stmt, span, text, source_name=config.query_file), span)
        loaded = self.session.loaded
        self.bound = [self._located(lambda q=q: bind(q.stmt, q.span, info=loaded.info(), tokenize=loaded.encode,
                                                     tables=(), source=text, dtype=self.session.settings.dtype),
                                    q.span) for q in self.run_file.queries]
        self.extra_schema = extra_schema(self.files)

    def _located(self, fn, span):
        try:
            return fn()
        except TdbqlError as err:
            raise with_source(locate(err, span, self.config.query_text), self.config.query_file,
                              self.config.query_text)

    def close(self) -> None:
        self.session.close()

    # --- one shard ---------------------------------------------------------------------------------

    def run_shard(self, shard: Shard) -> dict:
        started = time.perf_counter()
        mark_attempt(self.out, self.config.run_id, shard.id)
        raw = self.read(shard)
        rows, kept, skipped = self.prompts(raw)
        staged = Staged(self.out)
        tables: dict[str, dict] = {}
        tokens = 0
        if rows:
            self.session.set_prompts(rows)
            for name, table in self._prompt_tables(kept).items():
                tables[name] = self._stage(staged, table_file(name, shard.id), table, merge="rows")
                if name == "prompts":
                    tokens = pc.sum(table.column("n_tokens")).as_py() or 0
            for query, stmt in zip(self.run_file.queries, self.bound):
                bound = self._located(lambda: bind_query(
                    stmt, query.span, session_loss=self.session.loss, source=self.config.query_text,
                    prompts_have_targets=all(p.target for p in rows),
                    prompts_have_pairs=all(p.corrupt is not None for p in rows)), query.span)
                info = {"query": query.index, "merge": query.merge, "plan": bound.model_dump(mode="json")}
                outputs = self._located(lambda: self._run_query(query, bound, rows, shard, staged), query.span)
                for name, (rel, rows_out) in outputs.items():
                    tables[name] = {**info, "file": rel, "rows": rows_out}
        self._commit(staged, shard)
        return {"shard": shard.id, "start": shard.start, "rows_read": len(raw), "prompts": len(rows),
                "tokens": int(tokens), "skipped": skipped, "tables": tables,
                "seconds": round(time.perf_counter() - started, 3)}

    def read(self, shard: Shard) -> list[tuple[int, RawRow]]:
        """The shard's rows with their prompt ids (the row's place in the dataset)."""
        out = []
        for index, start, stop, first_id in pieces(shard, self.files):
            out += [(first_id + r.index - start, r) for r in read_range(self.files[index], start, stop)]
        return out

    def prompts(self, raw: list[tuple[int, RawRow]]) -> tuple[list[PromptRow], list[RawRow], list[dict]]:
        """The shard's prompts, the rows they came from, and the malformed rows (`--on-error
        skip`); `stop` raises at the first."""
        loaded = self.session.loaded
        rows, kept, skipped = [], [], []
        for prompt_id, r in raw:
            error = r.error
            if error is None:
                row = r.prompt(prompt_id)
                error = _row_problem(loaded, row)
            if error is None:
                rows.append(row)
                kept.append(r)
            elif self.config.on_error == "stop":
                raise TdbqlError(f"{r.where}: malformed row: {error}; the run stopped (--on-error stop; "
                                 "--on-error skip leaves such rows out and goes on)")
            else:
                skipped.append({"where": r.where, "error": error})
        return rows, kept, skipped

    def _prompt_tables(self, kept: list[RawRow]) -> dict[str, pa.Table]:
        """The session's prompts, tokens and corrupt_tokens tables for the shard, the dataset's
        extra columns beside the prompts (renamed data_NAME where a name is the session's)."""
        con = self.session.con
        out = {name: con.sql(f"SELECT * FROM {name} ORDER BY {order}").to_arrow_table()
               for name, order in PROMPT_TABLE_ORDER.items()}
        schema = self.extra_schema
        if len(schema):
            extras = extras_table(kept, schema)
            prompts = out["prompts"]
            for field, column in zip(schema, extras.columns):
                name = f"data_{field.name}" if field.name in prompts.column_names else field.name
                prompts = prompts.append_column(pa.field(name, field.type), column)
            out["prompts"] = prompts
        return out

    def _run_query(self, query, bound: BoundQuery, rows: list[PromptRow], shard: Shard,
                   staged: Staged) -> dict[str, tuple[str, int]]:
        """Run one query over the shard and stage what its merge needs: {table: (file, rows)}."""
        engine = self.session._engine()  # the session's Engine, with the file's `set` settings
        name = query.tables[0]
        if query.merge == "over_nodes":
            state = self._over_state(engine, bound, rows)
            rel = partial_file(name, shard.id, "pt")
            torch.save(state, staged.path_for(rel))
            return {name: (rel, 0)}
        if query.merge == "over_rows":
            per_prompt = BoundQuery(query=bound.query.model_copy(update={"over_prompts": None}), loss=bound.loss)
            table = engine.run(per_prompt, rows)["result"]
            if isinstance(bound.query, PatchingQuery) and token_conditions_relative(bound.query.where):
                table = positions_from_end(table, self._run_lengths(bound.query, rows))
            return {name: self._stage_rows(staged, partial_file(name, shard.id), table)}
        tables = engine.run(bound, rows)
        if len(query.tables) > 1:  # routes: route_nodes, route_edges under the query's name
            named = {f"{query.stmt.name}_{key.removeprefix('route_')}": t for key, t in tables.items()}
        else:
            named = {name: tables["result"]}
        where = partial_file if query.merge == "topk" else table_file
        return {n: self._stage_rows(staged, where(n, shard.id), t) for n, t in named.items()}

    @staticmethod
    def _stage_rows(staged: Staged, rel: str, table: pa.Table) -> tuple[str, int]:
        staged.parquet(rel, table)
        return rel, table.num_rows

    @staticmethod
    def _stage(staged: Staged, rel: str, table: pa.Table, merge: str) -> dict:
        staged.parquet(rel, table)
        return {"merge": merge, "file": rel, "rows": table.num_rows}

    def _over_state(self, engine, bound: BoundQuery, rows: list[PromptRow]) -> dict:
        """The `over prompts` accumulators of the shard: Engine.visit_NodeQuery's loop, keeping
        the sink instead of ranking it (merge.finish_over ranks the merged sinks)."""
        loaded = self.session.loaded
        prompts, edits = engine.interventions(bound, rows)
        plan = engine.plan(bound, prompts)
        prompts = paired_rows(plan, prompts)
        batch_size = engine.plan_batch_size(plan, prompts)
        if hasattr(engine, "admit"):  # memory admission, where the engine has it (as visit_NodeQuery does)
            batch_size = engine.admit(plan, prompts, batch_size)
        sink = OverPromptsSink(bound.query.over_prompts, plan.relative_positions)
        for batch in batches(loaded, prompts, max_prompts=batch_size, pairs=plan.pairs):
            for block in node_blocks(loaded, plan, batch, edits, engine.weights, compiled=engine.compiled):
                sink.add(block, batch.lengths)
        state = sink_state(sink, plan.scalars, loaded.token_str)
        state["acc"] = {k: {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in acc.items()}
                        for k, acc in state["acc"].items()}
        state["tokens"] = {k: {n: v.cpu() for n, v in tok.items()} for k, tok in state["tokens"].items()}
        return state

    def _run_lengths(self, query: PatchingQuery, rows: list[PromptRow]) -> dict[int, int]:
        """Tokens of each pair's running prompt (the corrupt one when patching from clean)."""
        encode = self.session.loaded.encode
        return {r.prompt_id: len(encode(r.corrupt if query.source == "clean" else r.text)) for r in rows}

    def _commit(self, staged: Staged, shard: Shard) -> None:
        between = None
        fault = self.config.fault or ""
        if fault == f"kill:{shard.id}":
            marker = self.out / "_attempts" / self.config.run_id / f"fault-{shard.id}"
            if not marker.exists():
                marker.touch()
                between = lambda i: os._exit(3)  # noqa: E731  (a worker killed mid-commit)
        staged.commit(between)


def _row_problem(loaded, row: PromptRow) -> str | None:
    """Why a prompt cannot run (what batching and the loss would refuse), or None."""
    try:
        encode_prompts(loaded, [row])
        if row.corrupt is not None:
            encode_prompts(loaded, [row.model_copy(update={"text": row.corrupt})], what="corrupt prompt")
    except TdbqlError as err:
        return err.message
    for what, text in (("target", row.target), ("distractor", row.distractor)):
        if text is not None and len(loaded.encode(text)) != 1:
            return f"{what} {text!r} is {len(loaded.encode(text))} tokens; targets must be single tokens"
    return None
