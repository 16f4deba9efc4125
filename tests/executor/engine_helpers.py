"""Running plan objects through the binder and the engine, as the session does.

The engine takes only bound queries (query/bind.py), so tests that build plan objects by hand
bind them here first: `run(engine, query, rows, loss)` is `Session.execute` without the text.
"""

from __future__ import annotations

from collections.abc import Sequence

from tdbql.query.bind import bind, bind_query
from tdbql.query.plan import BoundQuery, Loss


def bound(loaded, query, loss: Loss | None = None, rows: Sequence = ()) -> BoundQuery:
    checked = bind(query, None, info=loaded.info(), tokenize=loaded.encode)
    return bind_query(checked, None, session_loss=loss,
                      prompts_have_targets=bool(rows) and all(r.target for r in rows))


def run(engine, query, rows, loss: Loss | None = None) -> dict:
    return engine.run(bound(engine.loaded, query, loss, rows), rows)


def explain(engine, query, rows, loss: Loss | None = None) -> str:
    return engine.explain(bound(engine.loaded, query, loss, rows), rows)


def plan(engine, query, rows, loss: Loss | None = None):
    return engine.plan(bound(engine.loaded, query, loss, rows), rows)
