"""Every ```tql example in docs/language.md parses and binds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tdbql.grammar.parse import parse
from tdbql.query.bind import bind

DOC = Path(__file__).parents[2] / "docs" / "language.md"
EXAMPLES = re.findall(r"```tql\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
TABLES = ("prompts", "tokens", "queries", "my_table", "top_nodes", "pattern")


def test_the_reference_has_an_example_for_every_construct():
    statements = [stmt for example in EXAMPLES for stmt, _ in parse(example)]
    kinds = {stmt.kind for stmt in statements}
    assert kinds == {
        "model", "sae", "prompt", "prompts_file", "prompts_sql", "target", "set", "nodes",
        "logits", "logit_lens", "upvoted", "routes", "explain", "sql", "metric", "patching", "generate",
    }
    assert len(statements) >= 60


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.splitlines()[0][:40] for e in EXAMPLES])
def test_example_parses_and_binds(example, tiny_info, tokenize):
    statements = parse(example)
    assert statements, "an example block holds at least one statement"
    for stmt, span in statements:
        bound = bind(stmt, span, info=tiny_info, tokenize=tokenize, tables=TABLES, source=example)
        assert bound.kind == stmt.kind


def test_the_applicability_table_is_the_catalogs():
    from tdbql.query.catalog import applicability_table

    assert applicability_table() in DOC.read_text()
