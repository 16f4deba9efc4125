"""A run file: its setup statements, its queries, their tables, and how each table is combined
across shards.

A run file is a query file without prompts: `model`, `sae`, `target` and `set` first (each worker
runs them once, after loading the model), then the queries. Each query's result combines in one
of four ways (`RunQuery.merge`), read off its plan:

- `rows`: every row belongs to one prompt (`select`, `by prompt` rankings, logits, the lens,
  upvoted, routes, generate, `metric` and `patching` per prompt): the table is the union of the
  shards' tables;
- `topk`: a ranking across prompts (`topk`/`bottomk` without `by prompt`): each shard keeps its
  top k per group, and the merge ranks their union again (merge.merge_topk);
- `over_nodes`: a node query `over prompts`: each shard keeps the running sums, counts and
  maxima per node, the merge adds them and ranks once (merge.merge_over_states);
- `over_rows`: `metric` or `patching` `over prompts`: each shard keeps its per-prompt rows, the
  merge reduces all of them as one process does.

What cannot be combined exactly is refused here, before anything runs (`refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...grammar.parse import parse
from ...query.errors import TdbqlError
from ...query.plan import (
    QUERY_TYPES,
    ExplainStmt,
    GenerateQuery,
    MetricQuery,
    ModelStmt,
    NodeQuery,
    PatchingQuery,
    PromptsFromFile,
    PromptsFromSql,
    PromptStmt,
    RoutesQuery,
    SaeStmt,
    SetStmt,
    Span,
    SqlStmt,
    TargetStmt,
    UpvotedQuery,
)
from ..tables import RESERVED_TABLES
from ..text import with_source

SETUP_TYPES = (ModelStmt, SaeStmt, TargetStmt, SetStmt)
MERGE_WORDS = {
    "rows": "the union of the shards' rows (each row belongs to one prompt)",
    "topk": "each shard's top k per group, ranked again over their union",
    "over_nodes": "each shard's sums, counts and maxima per node, added, then reduced and ranked once",
    "over_rows": "each shard's per-prompt rows, reduced over all prompts at the end",
}


@dataclass(frozen=True)
class RunQuery:
    index: int  # 1-based, among the file's queries
    stmt: object  # the parsed query, its name filled in (q1, q2, ... as a fresh session names them)
    span: Span
    tables: tuple[str, ...]
    merge: str  # rows | topk | over_nodes | over_rows


@dataclass(frozen=True)
class RunFile:
    text: str
    source: str | None
    setup: tuple[tuple[object, Span], ...]
    queries: tuple[RunQuery, ...]


def read_run_file(text: str, source: str | None, *, has_corrupt: bool) -> RunFile:
    """Parse and check a run file; `has_corrupt`: the dataset has a `corrupt` column."""
    try:
        statements = parse(text)
    except TdbqlError as err:
        raise with_source(err, source, text)
    setup, queries, names = [], [], set()
    for stmt, span in statements:
        try:
            if isinstance(stmt, SETUP_TYPES):
                _setup(stmt, setup, queries)
                setup.append((stmt, span))
            elif isinstance(stmt, QUERY_TYPES):
                _refuse(stmt, has_corrupt)
                query = _named(stmt, len(queries) + 1)
                tables = table_names(query)
                clash = names & set(tables)
                if clash:
                    raise TdbqlError(f"two queries write table {sorted(clash)[0]}; name one with `as NAME`")
                names |= set(tables)
                queries.append(RunQuery(len(queries) + 1, query, span, tables, merge_kind(query)))
            else:
                raise TdbqlError(_not_in_runs(stmt))
        except TdbqlError as err:
            if err.line is None:
                err.line, err.column, err.source = span.line, span.column, text
            raise with_source(err, source, text)
    if not queries:
        raise TdbqlError(f"{source or 'the run file'} has no query to run over the prompts")
    return RunFile(text, source, tuple(setup), tuple(queries))


def _setup(stmt, setup: list, queries: list) -> None:
    if queries:
        raise TdbqlError(f"in a run file, `{stmt.kind}` statements come before the queries (each worker runs them "
                         "once, before its first shard)")
    if isinstance(stmt, ModelStmt) and any(isinstance(s, ModelStmt) for s, _ in setup):
        raise TdbqlError("a run loads one model: give one `model` statement")


def _not_in_runs(stmt) -> str:
    if isinstance(stmt, (PromptStmt, PromptsFromFile, PromptsFromSql)):
        return "a run reads its prompts from --prompts; remove this statement from the run file"
    if isinstance(stmt, SqlStmt):
        return ("SQL runs after a run, over its results (`tdbql --db x.duckdb`, then `.attach OUT`); a run file "
                "holds only model, sae, target, set and queries")
    if isinstance(stmt, ExplainStmt):
        return "to see a run's plan, give `tdbql run ... --explain`"
    return f"`{stmt.kind}` statements cannot be part of a run file"


def _named(query, index: int):
    if query.name is not None:
        if query.name.lower() in RESERVED_TABLES or query.name.startswith("_"):
            raise TdbqlError(f"'{query.name}' is a table name the run keeps for itself; name the result otherwise")
        return query
    return query.model_copy(update={"name": "route" if isinstance(query, RoutesQuery) else f"q{index}"})


def table_names(query) -> tuple[str, ...]:
    """The tables a named query writes (a route graph writes two)."""
    if isinstance(query, RoutesQuery):
        return (f"{query.name}_nodes", f"{query.name}_edges")
    return (query.name,)


def merge_kind(query) -> str:
    """How the query's table is combined across shards (module docstring)."""
    if isinstance(query, NodeQuery):
        if query.over_prompts:
            return "over_nodes"
        if query.mode == "select" or "prompt" in query.by:
            return "rows"
        return "topk"
    if isinstance(query, (MetricQuery, PatchingQuery)) and query.over_prompts:
        return "over_rows"
    return "rows"


def _refuse(query, has_corrupt: bool) -> None:
    """What a run cannot compute exactly shard by shard."""
    if getattr(query, "verify", False):
        raise TdbqlError("verify runs each ranked node's intervention on its prompt: rank over the dataset in a "
                         "run, then verify the top rows in the shell (prompts from the run's prompts table)")
    if any(a.value == "mean" for a in getattr(query, "ablations", ())):
        raise TdbqlError("ablate ...=mean averages over the whole prompt set, which no shard sees; give the "
                         "value as a number")
    if any(t.kind == "mean" for s in getattr(query, "steers", ()) for t in s.terms):
        raise TdbqlError("steer ... mean(...) averages over the whole prompt set, which no shard sees; steer by "
                         "a latent or an unembedding")
    if any(c.field == "prompt" for c in getattr(query, "where", ())):
        raise TdbqlError("where prompt ... names prompts by id; in a run, choose the prompts in the dataset instead")
    if isinstance(query, GenerateQuery) and query.temperature > 0:
        raise TdbqlError("sampled generation draws every prompt from one generator in order, which shards cannot "
                         "reproduce; a run generates greedily (temperature 0)")
    if isinstance(query, UpvotedQuery) and query.raw and query.node.component != "attn":
        raise TdbqlError("upvoted ... raw reads the weights, not the prompts: run it in the shell")
    if isinstance(query, NodeQuery) and not has_corrupt and any(s.name == "attrib_patch" for s in query.scalars):
        raise TdbqlError("attrib_patch in a run reads each prompt's pair from a `corrupt` column, which this "
                         "dataset lacks (consecutive prompts would pair across shards)")
