"""Meta-commands: pure handlers over a real session (tiny random model, in-memory DuckDB)."""

from __future__ import annotations

import pytest
from tdbql.query.catalog import SCALAR_NAMES as SCALARS
from tdbql.query.context import PromptRow
from tdbql.query.errors import TdbqlError
from tdbql.shell.meta import REGISTRY, ShellState, emit, is_meta, run_meta, run_script, script_parts
from tdbql.shell.session import Session
from tdbql.shell.text import render_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def state(tiny_model_dir):
    session = Session(model=str(tiny_model_dir))
    yield ShellState(session=session)
    session.close()


@pytest.fixture
def state_with_prompts(state):
    state.session.set_prompts([PromptRow(prompt_id=0, text="When Mary and John went to the store"),
                               PromptRow(prompt_id=1, text="The cat sat", target=" on", distractor=" the")])
    return state


def test_help_lists_every_command_once():
    text = run_meta(ShellState(session=None), ".help")
    names = {c.name for c in REGISTRY.values()}
    for name in names:
        assert sum(line.startswith(name + " ") or line.split()[0] == name
                   for line in text.splitlines() if line.strip()) == 1, name
    for required in (".help", ".tables", ".schema", ".mode", ".output", ".read", ".timer", ".models",
                     ".scalars", ".prompts", ".quit", ".plot"):
        assert required in names


def test_is_meta():
    assert is_meta("  .tables")
    assert not is_meta("select 1")


def test_unknown_command_suggests_the_nearest(state):
    with pytest.raises(TdbqlError) as info:
        run_meta(state, ".tabels")
    assert info.value.suggestion == ".tables"


def test_mode_sets_and_validates(state):
    assert run_meta(state, ".mode csv") == "mode csv"
    assert state.mode == "csv"
    with pytest.raises(TdbqlError, match="unknown format"):
        run_meta(state, ".mode xml")
    assert state.mode == "csv"


def test_timer_and_pager_toggle(state):
    assert run_meta(state, ".timer on") == "timer on" and state.timer
    assert run_meta(state, ".timer") == "timer off" and not state.timer
    run_meta(state, ".pager off")
    assert not state.pager
    with pytest.raises(TdbqlError, match="on or off"):
        run_meta(state, ".timer maybe")


def test_maxrows(state):
    run_meta(state, ".maxrows 5")
    assert state.max_rows == 5
    run_meta(state, ".maxrows all")
    assert state.max_rows is None
    with pytest.raises(TdbqlError):
        run_meta(state, ".maxrows -3")


def test_tables_and_schema_follow_the_prompt_set(state_with_prompts):
    state = state_with_prompts
    assert run_meta(state, ".tables").splitlines() == ["corrupt_tokens", "prompts", "queries", "tokens"]
    schema = run_meta(state, ".schema prompts")
    assert schema == ("prompts(prompt_id BIGINT, text VARCHAR, target VARCHAR, distractor VARCHAR, "
                      "n_tokens BIGINT, corrupt VARCHAR, corrupt_n_tokens BIGINT)")
    assert len(run_meta(state, ".schema").splitlines()) == 4
    with pytest.raises(TdbqlError, match="no table"):
        run_meta(state, ".schema nope")


def test_prompts_shows_rows_and_target(state_with_prompts):
    text = run_meta(state_with_prompts, ".prompts")
    assert "When Mary and John" in text and "The cat sat" in text
    assert "target: none" in text


def test_output_redirects_and_resets(state, tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    assert run_meta(state, f".output {path}") == f"output: {path}"
    assert state.output == path and path.read_text() == ""
    run_meta(state, ".output")
    assert state.output is None


def test_models_before_and_after_loading(state):
    text = run_meta(state, ".models")
    assert "loads on first use" in text and "gpt2-small" in text
    state.session.loaded  # noqa: B018 - load it
    assert "4 layers, 4 heads" in run_meta(state, ".models")


def test_scalars_lists_the_catalog(state):
    lines = run_meta(state, ".scalars").splitlines()
    assert [line.split()[0] for line in lines] == list(SCALARS)


def test_quit(state):
    run_meta(state, ".quit")
    assert state.quit


def test_plot_draws_each_kind(state, tmp_path):
    con = state.session.con
    con.execute("""CREATE TABLE pattern AS SELECT 0::BIGINT AS prompt_id, 1::BIGINT AS layer, 'attn' AS component,
                   2::BIGINT AS unit, p AS position, a AS attended, 't' || p AS token, 't' || a AS attended_token,
                   NULL::BIGINT AS rank, 1.0 / (p + 1) AS act
                   FROM range(4) r(p), range(4) s(a) WHERE a <= p""")
    con.execute("""CREATE TABLE grid AS SELECT 0::BIGINT AS prompt_id, l AS layer, p AS position, 'mlp' AS component,
                   (l * p)::DOUBLE AS act_times_grad FROM range(3) r(l), range(5) s(p)""")
    for table, kind in (("pattern", "attention"), ("grid", "layers"), ("grid", "bars")):
        out = tmp_path / f"{table}_{kind}.png"
        message = run_meta(state, f".plot {table} --kind {kind} --to {out}")
        assert message == f"wrote {out} ({kind})"
        assert out.read_bytes()[:8] == PNG_MAGIC
    assert "(attention)" in run_meta(state, f".plot pattern --to {tmp_path / 'auto.png'}")
    with pytest.raises(TdbqlError, match="no column"):
        run_meta(state, f".plot grid --value nope --to {tmp_path / 'x.png'}")
    with pytest.raises(TdbqlError, match="no table"):
        run_meta(state, ".plot missing")


def test_param_sets_lists_and_unsets(state):
    assert run_meta(state, ".param") == "no parameters"
    assert run_meta(state, ".param layer 2") == "$layer = 2"
    assert state.session.params == {"layer": "2"}
    assert run_meta(state, ".param") == "$layer = 2"
    run_meta(state, ".param $layer")
    assert state.session.params == {}
    with pytest.raises(TdbqlError, match="identifiers"):
        run_meta(state, ".param 2x 1")


def test_read_runs_a_file_and_keeps_output_before_an_error(state, tmp_path):
    good = tmp_path / "good.tql"
    good.write_text("create table t as select 1 as a;\nselect a from t;\n")
    run_meta(state, ".mode csv")
    assert run_meta(state, f".read {good}") == "OK\na\n1"
    bad = tmp_path / "bad.tql"
    bad.write_text("select 2 as b;\nselect * from missing;\n")
    with pytest.raises(TdbqlError) as info:
        run_meta(state, f".read {bad}")
    assert info.value.partial_output == "b\n2"
    assert render_error(info.value).startswith(f"{bad}:2:1: SQL error")
    with pytest.raises(TdbqlError, match="cannot read"):
        run_meta(state, f".read {tmp_path / 'none.tql'}")


# --- scripts with meta-command lines -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, parts",
    [
        ("select 1;", [(False, 1, "select 1;")]),
        (".mode csv\nselect 1;", [(True, 1, ".mode csv"), (False, 1, "select 1;")]),
        ("topk 3 act\n  .param layer 2   -- the layer\ntopk 3 act where layer = $layer",
         [(False, 1, "topk 3 act"), (True, 2, ".param layer 2"), (False, 2, "-- the layer\ntopk 3 act where layer = $layer")]),
        # a line starting with '.' inside a SQL statement or string is not a meta-command
        ("select 1\n.5 as x;\nselect '\n.tables';", [(False, 1, "select 1\n.5 as x;\nselect '\n.tables';")]),
        ("-- a comment\n.tables\n\n.quit", [(True, 2, ".tables"), (True, 4, ".quit")]),
        (".mode csv; select 2;", [(True, 1, ".mode csv"), (False, 1, "select 2;")]),
    ],
)
def test_script_parts(text, parts):
    got = script_parts(text)
    assert [(p.meta, p.line, p.text.strip()) for p in got] == parts
    lines = text.split("\n")
    for part in got:  # statement runs keep the script's lines and columns
        if not part.meta:
            for i, line in enumerate(part.text.split("\n")):
                column = len(line) - len(line.lstrip())
                assert lines[i][column:].startswith(line.strip())


def test_script_runs_meta_lines_in_order_with_params(state, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    script = f"select 1 as a;\n.param n 7\n.output {out}\n.mode csv\nselect $n as n;\n.output\nselect 2 as b;"
    for shown in run_script(state, script, "s.tql", confirm_settings=False):
        emit(state, shown)
    assert out.read_text() == "n\n7\n"
    printed = capsys.readouterr().out
    assert printed.startswith("a") and printed.splitlines()[-2:] == ["b", "2"]
    assert "mode" not in printed and "$n" not in printed  # settings are not confirmed in scripts
    assert run_script(state, ".param", confirm_settings=False).__next__() == "$n = 7"


def test_script_stops_at_quit(state):
    shown = list(run_script(state, "select 1 as a;\n.quit\nselect * from nowhere;"))
    assert state.quit and len(shown) == 2


def test_bad_meta_line_in_a_script_names_file_line_and_column(state):
    with pytest.raises(TdbqlError) as info:
        list(run_script(state, "select 1;\n\n  .mode xml", "job.tql"))
    text = render_error(info.value)
    assert text.startswith("job.tql:3:3: ") and "xml" in text
    assert text.splitlines()[-2:] == ["      .mode xml", "      ^"]


def test_param_used_before_it_is_set_is_an_error(state):
    with pytest.raises(TdbqlError, match=r"\$n"):
        list(run_script(state, "select $n;\n.param n 1"))


def test_emit_pages_long_output_and_writes_output_files(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    import tdbql.shell.meta as meta
    from tdbql.shell.meta import ShellState

    paged = []
    monkeypatch.setattr(meta.pydoc, "pager", paged.append)
    monkeypatch.setattr(meta.shutil, "get_terminal_size", lambda fallback=None: SimpleNamespace(lines=10, columns=40))
    monkeypatch.setattr(meta.sys.stdout, "isatty", lambda: True)
    state = ShellState(session=None)
    long_text = "\n".join(str(i) for i in range(30))
    wide_text = "x" * 50
    meta.emit(state, long_text)
    meta.emit(state, wide_text)
    meta.emit(state, "short")
    assert paged == [long_text, wide_text]
    assert capsys.readouterr().out == "short\n"
    state.pager = False
    meta.emit(state, long_text)
    assert len(paged) == 2
    state.output = tmp_path / "out.txt"
    meta.emit(state, "to file")
    meta.emit(state, "again")
    assert state.output.read_text() == "to file\nagain\n"
