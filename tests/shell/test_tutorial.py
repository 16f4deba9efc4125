"""Run every command of docs/tutorial.md, in order, and check the structure of what it builds.

Blocks: ```tdbql (statements and `.meta` lines, run as the shell runs a script),
```tdbql file=NAME (written to NAME), ```sh (each `tdbql ...` line run as the console script).
The embedded model is used when it is present, else the tiny random GPT-2; numbers are never
asserted, only shapes and invariants (attention rows sum to one, rankings are sorted, ...).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import duckdb
import pytest
from tdbql.shell.meta import ShellState, run_script
from tdbql.shell.session import Session

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def tutorial_blocks() -> list[tuple[str, str, str]]:
    """(language, info, body) for every fenced block, in order."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in BLOCK.finditer(TUTORIAL.read_text())]


@pytest.fixture
def model_name(tiny_model_dir) -> str:
    from tdbql.executor.runtime.loading import DEFAULT_MODEL_DIR

    return "default" if (DEFAULT_MODEL_DIR / "config.json").exists() else str(tiny_model_dir)


def test_tutorial_has_every_kind_of_block():
    kinds = {(lang, info.split("=")[0]) for lang, info, _ in tutorial_blocks()}
    assert {("tdbql", ""), ("tdbql", "file"), ("sh", "")} <= kinds


def test_tutorial_runs(model_name, tdbql_bin, cli_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = Session(model=model_name)
    state = ShellState(session=session)
    shell_runs = []
    for lang, info, body in tutorial_blocks():
        if lang == "tdbql" and info.startswith("file="):
            (tmp_path / info.removeprefix("file=")).write_text(body)
        elif lang == "tdbql":
            for _ in run_script(state, body):
                pass
        elif lang == "sh":
            shell_runs += [line for line in body.splitlines() if line.startswith("tdbql ")]
    check_tables(session)
    assert (tmp_path / "last_attention.png").stat().st_size > 0
    assert (tmp_path / "heads_mean.png").stat().st_size > 0
    session.close()
    for line in shell_runs:
        run_shell_line(line, model_name, tdbql_bin, cli_env, tmp_path)
    with duckdb.connect(str(tmp_path / "ioi.duckdb"), read_only=True) as con:
        assert con.sql("SELECT table_name FROM queries ORDER BY query_id").fetchall() == [("heads",), ("promoted",)]


def run_shell_line(line: str, model_name: str, tdbql_bin: str, env: dict[str, str], cwd: Path) -> None:
    args = shlex.split(line)[1:]
    if model_name != "default":
        args = ["--model", model_name, *args]
    proc = subprocess.run([tdbql_bin, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{line}\n{proc.stderr}"
    assert proc.stdout.strip()


def sql(session: Session, text: str) -> list[tuple]:
    return session.con.sql(text).fetchall()


def check_tables(session: Session) -> None:
    info = session.loaded.info()
    n_tokens = len(session.loaded.encode("When Mary and John went to the store, John gave a drink to"))
    assert sql(session, "SELECT count(*), min(rank), max(rank) FROM before") == [(5, 1, 5)]
    heads = sql(session, "SELECT component, unit, direct_effect FROM heads ORDER BY rank")
    assert len(heads) == min(8, info.n_layers * info.n_heads)
    assert {h[0] for h in heads} == {"head"}
    effects = [h[2] for h in heads]
    assert effects == sorted(effects, reverse=True)
    # the dense pattern at the last token: one row per (layer, head, key); each head's row sums to 1
    sums = sql(session, "SELECT layer, unit, count(*), sum(act) FROM last_attention GROUP BY layer, unit")
    assert len(sums) == info.n_layers * info.n_heads
    for _, _, keys, total in sums:
        assert keys == n_tokens and total == pytest.approx(1.0, abs=1e-4)
    neurons = sql(session, "SELECT component, act_times_grad FROM neurons ORDER BY rank")
    assert len(neurons) == 10 and {n[0] for n in neurons} == {"mlp"}
    assert [n[1] for n in neurons] == sorted((n[1] for n in neurons), reverse=True)
    assert sql(session, "SELECT count(*) FROM promoted") == [(5,)]
    assert sql(session, "SELECT count(*) FROM ablated") == [(20,)]
    assert len(session.prompts) == 4 and {p.target for p in session.prompts} == {" Mary", " John"}
    assert sql(session, "SELECT count(*) FROM heads_mean") == [(min(8, info.n_layers * info.n_heads),)]
    assert sql(session, "SELECT count(DISTINCT prompt_id), max(rank) FROM per_prompt") == [(4, 2)]
    names = sql(session, "SELECT table_name FROM queries ORDER BY query_id")
    against = [r[0] for r in sql(session, "SELECT direct_effect FROM against ORDER BY rank")]
    assert len(against) == 3 and against == sorted(against) and against[0] <= effects[-1]
    assert [n[0] for n in names] == ["before", "heads", "last_attention", "against", "neurons", "promoted", "before20",
                                     "ablated", "heads_mean", "per_prompt", "route_nodes,route_edges"]
    assert sql(session, "SELECT count(DISTINCT prompt_id) FROM route_nodes") == [(4,)]
    # a graph edge is kept when its weight passes the threshold; attention edges sum over heads
    [(weakest,)] = sql(session, """
        SELECT min(w) FROM (
            SELECT sum(weight) AS w FROM route_edges WHERE kind = 'attn'
            GROUP BY prompt_id, layer, src_position, dst_position
            UNION ALL SELECT weight FROM route_edges WHERE kind <> 'attn')""")
    assert weakest > 0.04
    assert sql(session, "SELECT bool_and(src_position <= dst_position) FROM route_edges") == [(True,)]
