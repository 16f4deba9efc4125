"""Text -> plan fixture pairs (tests/fixtures/plans/*.txt), sqlglot style.

Each file alternates an input line and the expected plan as JSON (one statement as an object,
several as a list). Fields left out of the JSON take the plan's defaults; blank lines and lines
starting with '#' are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from tdbql.grammar.parse import parse
from tdbql.query.plan import Statement

FIXTURES = Path(__file__).parents[1] / "fixtures" / "plans"
STATEMENT = TypeAdapter(Statement)


def load_pairs(path: Path) -> list[tuple[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) % 2 == 0, f"{path.name}: odd number of lines"
    return list(zip(lines[::2], lines[1::2]))


PAIRS = [
    pytest.param(text, expected, id=f"{path.stem}:{i}")
    for path in sorted(FIXTURES.glob("*.txt"))
    if path.stem != "bound"
    for i, (text, expected) in enumerate(load_pairs(path))
]


def test_there_are_at_least_60_pairs():
    assert len(PAIRS) >= 60


@pytest.mark.parametrize("text, expected", PAIRS)
def test_text_parses_to_plan(text: str, expected: str):
    wanted = json.loads(expected)
    wanted = wanted if isinstance(wanted, list) else [wanted]
    got = [stmt for stmt, _ in parse(text)]
    assert got == [STATEMENT.validate_python(item) for item in wanted]


@pytest.mark.parametrize("text, expected", PAIRS)
def test_plans_round_trip_through_json_and_hash(text: str, expected: str):
    for stmt, _ in parse(text):
        again = STATEMENT.validate_json(stmt.model_dump_json())
        assert again == stmt
        assert hash(again) == hash(stmt)
