"""Physical-plan fixtures (the sqlglot habit): query text -> the exact `explain` output.

tests/fixtures/explain.txt holds blocks `>>> QUERY` followed by the plan `explain QUERY` prints on
the embedded model, for the session set up below (two IOI pairs, each prompt's corrupt version
the other, and a target).
The figures (batch size, bytes) are deterministic for the embedded model. After an intended
change, `python -m tests.shell.test_explain_fixtures` rewrites the file from the current code;
review its diff like code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tdbql.shell.session import Session

FIXTURE = Path(__file__).parents[1] / "fixtures" / "explain.txt"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
SETUP = f'prompt "{CLEAN}" corrupt "{CORRUPT}", "{CORRUPT}" corrupt "{CLEAN}"\ntarget " Mary" vs " John"'



def load_blocks(path: Path) -> list[tuple[str, str]]:
    blocks, query, lines = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith(">>> "):
            if query is not None:
                blocks.append((query, "\n".join(lines).strip("\n")))
            query, lines = line[4:], []
        elif query is not None:
            lines.append(line)
        # lines before the first query are the file's own comments
    if query is not None:
        blocks.append((query, "\n".join(lines).strip("\n")))
    return blocks


BLOCKS = load_blocks(FIXTURE)


@pytest.fixture(scope="module")
def session():
    s = Session()
    s.execute(SETUP)
    yield s
    s.close()


def explain(session: Session, query: str) -> str:
    return session.execute(f"explain {query}")[0].message


def test_there_are_at_least_a_dozen_plans():
    assert len(BLOCKS) >= 12


@pytest.mark.parametrize("query, expected", BLOCKS, ids=[q for q, _ in BLOCKS])
def test_explain_prints_the_fixture_plan(session, query, expected):
    assert explain(session, query) == expected


def write_fixtures() -> None:
    """Rewrite the fixture file: its comment header, then each query with what explain prints now."""
    header = []
    for line in FIXTURE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    session = Session()
    session.execute(SETUP)
    out = header + [""]
    for query, _ in BLOCKS:
        out += [f">>> {query}", explain(session, query), ""]
    FIXTURE.write_text("\n".join(out))


if __name__ == "__main__":
    write_fixtures()
