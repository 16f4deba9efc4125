"""Run every command of docs/tutorial.md, in order, and check the structure of what it builds.

Blocks: ```tdbql (statements and `.meta` lines, run as the shell runs a script),
```tdbql file=NAME (written to NAME), ```sh (each `tdbql ...` line run as the console script).
The embedded model is used when it is present, else the tiny random GPT-2; numbers are never
asserted, only shapes and invariants (attention rows sum to one, rankings are sorted, ...).
"""

from __future__ import annotations

import math
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
    shell_runs, shown = [], []
    for lang, info, body in tutorial_blocks():
        if lang == "tdbql" and info.startswith("file="):
            (tmp_path / info.removeprefix("file=")).write_text(body)
        elif lang == "tdbql":
            shown += run_script(state, body)
        elif lang == "sh":
            shell_runs += [line for line in body.splitlines() if line.startswith("tdbql ")]
    check_tables(session)
    if model_name == "default":
        check_name_orders(session)
    check_interventions(session, shown)
    check_route_page(session, tmp_path, model_name == "default")
    for picture in ("last_attention.png", "heads_mean.png", "recovery.png"):
        assert (tmp_path / picture).stat().st_size > 0
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
    assert sql(session, "SELECT count(*) FROM heads_mean") == [(min(8, info.n_layers * info.n_heads),)]
    assert sql(session, "SELECT count(DISTINCT prompt_id), max(rank) FROM per_prompt") == [(4, 2)]
    for table in ("without_1_0", "without_3_0", "without_3_1"):
        assert sql(session, f"SELECT count(*), bool_and(metric_corrupt IS NULL) FROM {table}") == [(4, True)]
    names = sql(session, "SELECT table_name FROM queries ORDER BY query_id")
    against = [r[0] for r in sql(session, "SELECT direct_effect FROM against ORDER BY rank")]
    assert len(against) == 3 and against == sorted(against) and against[0] <= effects[-1]
    assert [n[0] for n in names] == ["before", "heads", "last_attention", "against", "neurons", "promoted", "before20",
                                     "ablated", "heads_mean", "per_prompt", "where_heads_look", "without_1_0",
                                     "without_3_0", "without_3_1", "pair_metric", "resid_patching",
                                     "head_patching", "two_heads", "first_name", "checked", "checked_patch",
                                     "said", "said_without_movers", "toward_mary", "said_mary",
                                     "route_nodes,route_edges"]
    assert sql(session, "SELECT count(DISTINCT prompt_id) FROM route_nodes") == [(4,)]
    # a graph edge is kept when its weight passes the threshold; attention edges sum over heads
    [(weakest,)] = sql(session, """
        SELECT min(w) FROM (
            SELECT sum(weight) AS w FROM route_edges WHERE kind = 'attn'
            GROUP BY prompt_id, layer, src_position, dst_position
            UNION ALL SELECT weight FROM route_edges WHERE kind <> 'attn')""")
    assert weakest > 0.04
    assert sql(session, "SELECT bool_and(src_position <= dst_position) FROM route_edges") == [(True,)]


def check_name_orders(session: Session) -> None:
    """Section 6's claims about the embedded model: heads 1.0 and 3.0 copy a position, heads 3.1 and
    3.3 read the repeated name in both orders, and switching each off hurts the order it serves."""
    looked = dict(((layer, head), positions) for layer, head, positions in sql(session, """
        SELECT layer, unit, list(attended ORDER BY prompt_id) FROM (
            SELECT prompt_id, layer, unit, arg_max(attended, act) AS attended FROM where_heads_look GROUP BY ALL)
        GROUP BY ALL"""))
    assert looked[(1, 0)] == [1] * 4 and looked[(3, 0)] == [3] * 4
    assert looked[(3, 1)] == looked[(3, 3)] == [9] * 4
    drop = {table: [clean - ablated for clean, ablated in sql(
        session, f"SELECT metric_clean, metric FROM {table} ORDER BY prompt_id")]
        for table in ("without_1_0", "without_3_0", "without_3_1")}
    abba, baba = slice(0, 2), slice(2, 4)
    assert min(drop["without_1_0"][abba]) > 10 and max(drop["without_1_0"][baba]) < 5
    assert min(drop["without_3_0"][baba]) > 10 and max(drop["without_3_0"][abba]) < 5
    assert min(drop["without_3_1"]) > 8


PATCHING_COLUMNS = ["prompt_id", "layer", "component", "unit", "position", "token", "metric_clean", "metric_corrupt",
                    "metric_patched", "recovered"]


def columns(session: Session, table: str) -> list[str]:
    return [r[0] for r in sql(session, f"SELECT column_name FROM (DESCRIBE {table})")]


def check_interventions(session: Session, shown: list[str]) -> None:
    """Section 9: prompt pairs, metric, patching sweeps and verify (structure and exact invariants only)."""
    info = session.loaded.info()
    prompts = session.prompts
    assert len(prompts) == 4 and all(p.corrupt is not None for p in prompts)
    assert {p.target for p in prompts} == {p.distractor for p in prompts} == {" Mary", " John", " Alice", " Bob"}
    # no intervention in the statement: metric is the clean run's
    assert columns(session, "pair_metric") == ["prompt_id", "metric", "metric_clean", "metric_corrupt"]
    assert sql(session, """SELECT count(*), bool_and(abs(metric - metric_clean) < 1e-4 * (1 + abs(metric_clean)))
                           FROM pair_metric""") == [(4, True)]
    # the swapped name: the one position where a pair's tokens differ
    differ = sql(session, """
        SELECT t.prompt_id, t.position FROM tokens t JOIN corrupt_tokens c USING (prompt_id, position)
        WHERE t.token_id <> c.token_id""")
    assert sorted(prompt_id for prompt_id, _ in differ) == [0, 1, 2, 3]
    swapped = dict(differ)
    n_tokens = len(session.loaded.encode(prompts[0].text))
    assert columns(session, "resid_patching") == PATCHING_COLUMNS
    assert sql(session, """SELECT count(*), count(DISTINCT prompt_id), min(layer), max(layer),
                                  bool_and(component = 'resid.pre'), bool_and(isfinite(recovered))
                           FROM resid_patching""") == [(4 * info.n_layers * n_tokens, 4, 0, info.n_layers - 1, True, True)]
    # exact for any weights: before the swapped name the two runs agree (a causal model), and at
    # the input of layer 0 patching the swapped position alone is the clean run
    for prompt_id, position in swapped.items():
        [(before, at_layer0)] = sql(session, f"""
            SELECT max(abs(recovered)) FILTER (WHERE position < {position}),
                   max(abs(recovered - 1)) FILTER (WHERE layer = 0 AND position = {position})
            FROM resid_patching WHERE prompt_id = {prompt_id}""")
        assert before < 1e-3 and at_layer0 < 1e-3
    assert sql(session, "SELECT count(*) FROM recovery") == [(info.n_layers * n_tokens,)]
    assert columns(session, "head_patching") == PATCHING_COLUMNS
    assert sql(session, """SELECT count(*), count(DISTINCT (layer, unit)), bool_and(prompt_id IS NULL),
                                  bool_and(component = 'head'), bool_and(isfinite(recovered))
                           FROM head_patching""") == [(info.n_layers * info.n_heads,) * 2 + (True, True, True)]
    assert sql(session, "SELECT count(*), any_value(prompt_id) FROM two_heads") == [(1, None)]
    assert sql(session, "SELECT count(*) FROM first_name") == [(4,)]
    for table, scalar, k in (("checked", "act_times_grad", 20), ("checked_patch", "attrib_patch", 10)):
        assert columns(session, table)[-2:] == [scalar, "actual_effect"]
        ranked = sql(session, f"SELECT {scalar}, actual_effect FROM {table} ORDER BY rank")
        assert len(ranked) == k and all(math.isfinite(effect) for _, effect in ranked)
        assert [r[0] for r in ranked] == sorted((r[0] for r in ranked), reverse=True)
        line = re.compile(rf"^verify: Spearman rank correlation (-?[0-9.]+) between {scalar} and actual_effect "
                          rf"over {k} rows$", re.M)
        [rho] = [float(m.group(1)) for text in shown for m in line.finditer(text)]
        assert -1 <= rho <= 1
    check_generation(session)


def check_generation(session: Session) -> None:
    """Section 10: three tokens per prompt with and without the two heads, a steered metric and token."""
    for table in ("said", "said_without_movers"):
        assert columns(session, table) == ["prompt_id", "step", "token_id", "token", "logprob"]
        assert sql(session, f"SELECT count(*), count(DISTINCT prompt_id), max(step), bool_and(logprob <= 0) "
                            f"FROM {table}") == [(12, 4, 2, True)]
    assert sql(session, "SELECT count(*) FROM toward_mary") == [(4,)]
    assert sql(session, "SELECT count(*), max(step) FROM said_mary") == [(4, 0)]


def check_route_page(session: Session, folder: Path, embedded: bool) -> None:
    """Section 11: routes.html draws prompt 0's route (a line per edge row); on the embedded model
    the strongest attention edge into the last token comes from each prompt's answer: head 1.0
    from position 1 (answer first), head 3.0 from position 3 (answer second)."""
    from tdbql.shell.pages import route_graph_of
    from tdbql.shell.pages.sources import read_table

    page = (folder / "routes.html").read_text()
    assert "Plotly.newPlot" in page and "route_edges: route graph" in page
    drawn = route_graph_of(session, "route_edges", read_table(session, "route_edges"))
    assert (drawn.prompt_id, len(drawn.edges)) == (0, sql(session, "SELECT count(*) FROM route_edges "
                                                                   "WHERE prompt_id = 0")[0][0])
    if not embedded:
        return
    strongest = sql(session, """
        SELECT e.prompt_id, arg_max((e.layer, e.head, e.src_position, t.token), e.weight)
        FROM route_edges e JOIN tokens t ON t.prompt_id = e.prompt_id AND t.position = e.src_position
        WHERE e.kind = 'attn' AND e.src_position < e.dst_position
          AND e.dst_position = (SELECT max(position) FROM tokens WHERE prompt_id = e.prompt_id)
        GROUP BY e.prompt_id ORDER BY e.prompt_id""")
    targets = [p.target for p in session.prompts]
    assert [tuple(s) for _, s in strongest] == [
        (1, 0, 1, targets[0]), (3, 0, 3, targets[1]), (1, 0, 1, targets[2]), (3, 0, 3, targets[3])]
    heads_into_last = {(layer, head, src) for layer, head, src in sql(session, """
        SELECT layer, head, src_position FROM route_edges
        WHERE prompt_id = 0 AND kind = 'attn' AND dst_position = 13 AND src_position < 13""")}
    assert {(1, 0, 1), (3, 3, 9)} <= heads_into_last
