"""Meta-commands: pure handlers over a real session (tiny random model, in-memory DuckDB)."""

from __future__ import annotations

import pytest

from tdbql.query.meta import REGISTRY, ShellState, is_meta, run_meta
from tdbql.query.plan import SCALARS, PromptRow, TdbqlError
from tdbql.query.session import Session, render_error

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
    assert run_meta(state, ".tables").splitlines() == ["prompts", "queries", "tokens"]
    schema = run_meta(state, ".schema prompts")
    assert schema == ("prompts(prompt_id BIGINT, text VARCHAR, target VARCHAR, distractor VARCHAR, "
                      "n_tokens BIGINT)")
    assert len(run_meta(state, ".schema").splitlines()) == 3
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
