"""Meta-commands: pure handlers over a real session (tiny random model, in-memory DuckDB)."""

from __future__ import annotations

import pytest
from tdbql.query.catalog import SCALAR_NAMES as SCALARS
from tdbql.query.context import PromptRow
from tdbql.query.errors import TdbqlError
from tdbql.shell.meta import (
    REGISTRY,
    ShellState,
    emit,
    is_meta,
    run_meta,
    run_script,
    script_parts,
)
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
    assert state.output.path == path and state.output.format is None and path.read_text() == ""
    run_meta(state, ".output")
    assert state.output is None
    run_meta(state, f".output {tmp_path / 'x.JSONL'}")
    assert state.output.format == "jsonl"
    assert run_meta(state, f".once {tmp_path / 'y.parquet'}") == f"next result: {tmp_path / 'y.parquet'}"
    assert state.once.format == "parquet"
    with pytest.raises(TdbqlError, match="usage: .once FILE"):
        run_meta(state, ".once")


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
        assert message.startswith(f"wrote {out} ({kind}: ")
        assert out.read_bytes()[:8] == PNG_MAGIC
    assert "(attention: " in run_meta(state, f".plot pattern --to {tmp_path / 'auto.png'}")
    assert "(layers: " in run_meta(state, f".plot grid --to {tmp_path / 'auto.png'}")
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
         [(False, 1, "topk 3 act"), (True, 2, ".param layer 2"), (False, 2, "topk 3 act where layer = $layer")]),
        # `--word` on a meta-command line is an option; `-- ` starts a comment; `;` ends the command
        (".plot t --to x.png --kind bars -- a comment; not read\nselect 1;",
         [(True, 1, ".plot t --to x.png --kind bars"), (False, 1, "select 1;")]),
        (".plot t --to 'a b.png'; select 2;\n.tables --\n\\dt\nhelp\n  \\x auto",
         [(True, 1, ".plot t --to 'a b.png'"), (False, 1, "select 2;"), (True, 2, ".tables"), (True, 3, "\\dt"),
          (True, 4, "help"), (True, 5, "\\x auto")]),
        (".mode csv --no-such-option\ntopk 3 act -- not a meta line",
         [(True, 1, ".mode csv --no-such-option"), (False, 1, "topk 3 act -- not a meta line")]),
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
    assert state.quit and len(shown) == 1 and "nowhere" not in shown[0]


def test_bad_meta_line_in_a_script_names_file_line_and_column(state):
    with pytest.raises(TdbqlError) as info:
        list(run_script(state, "select 1;\n\n  .mode xml", "job.tql"))
    text = render_error(info.value)
    assert text.startswith("job.tql:3:3: ") and "xml" in text
    assert text.splitlines()[-2:] == ["      .mode xml", "      ^"]


def test_param_used_before_it_is_set_is_an_error(state):
    with pytest.raises(TdbqlError, match=r"\$n"):
        list(run_script(state, "select $n;\n.param n 1"))


def test_psql_aliases_and_help_are_meta_commands(state_with_prompts):
    state = state_with_prompts
    assert is_meta("\\dt") and is_meta("help") and is_meta("HELP plot") and not is_meta("helper")
    assert run_meta(state, "\\dt") == run_meta(state, ".tables")
    assert run_meta(state, "\\d prompts") == run_meta(state, ".schema prompts")
    assert run_meta(state, "help") == run_meta(state, "\\?") == run_meta(state, ".help")
    assert run_meta(state, "help plot").startswith(".plot [TABLE] [--kind K] [--value COL] [--to FILE]")
    assert "(also \\dt)" in run_meta(state, ".help .tables")
    with pytest.raises(TdbqlError, match="no command 'nope'"):
        run_meta(state, ".help nope")


def test_expanded_toggles_and_takes_auto(state):
    assert run_meta(state, "\\x") == "expanded on"
    assert run_meta(state, "\\x") == "expanded off"
    assert run_meta(state, ".expanded auto") == "expanded auto" and state.expanded == "auto"
    [shown] = run_script(state, "select 1 as a, 2 as b;")
    assert shown.startswith("a  b")  # it fits: no expansion
    state.width = 8
    [shown] = run_script(state, "select 1 as a, 2 as bbbbbbbbbbbbbbbbbb;")
    assert shown.startswith("-[ row 1 ]")


@pytest.mark.parametrize("value", ["99999999999999999999", "1000000001", "0", "-3", "1e3", "٣"])
def test_maxrows_is_a_range_checked_integer(state, value):
    with pytest.raises(TdbqlError, match="from 1 to 1000000000"):
        run_meta(state, f".maxrows {value}")
    assert run_meta(state, ".maxrows 1000000000") == "maxrows 1000000000"


def test_parameters_fill_meta_arguments_but_not_param_names(state, tmp_path):
    state.session.params.update({"out": str(tmp_path / "p.csv"), "layer": "2"})
    run_meta(state, ".output $out")
    assert state.output.path == tmp_path / "p.csv" and state.output.format == "csv"
    run_meta(state, ".param layer")  # unsets $layer: the name is not filled in
    assert "layer" not in state.session.params
    with pytest.raises(TdbqlError) as info:
        list(run_script(state, "select 1;\n.mode $nope", "job.tql"))
    assert render_error(info.value).startswith("job.tql:2:7: undefined parameter $nope")


def test_read_streams_its_output_and_names_its_own_lines(state, tmp_path):
    (tmp_path / "inner.tql").write_text("select 1 as a;\n.mode bogus\n")
    (tmp_path / "outer.tql").write_text(f"select 0 as z;\n.read {tmp_path / 'inner.tql'}\nselect 2;\n")
    shown = []
    with pytest.raises(TdbqlError) as info:
        for item in run_script(state, (tmp_path / "outer.tql").read_text(), str(tmp_path / "outer.tql")):
            shown.append(item)
    assert [s.splitlines()[0] for s in shown] == ["z", "a"]
    assert render_error(info.value).startswith(f"{tmp_path / 'inner.tql'}:2:1: unknown format 'bogus'")
