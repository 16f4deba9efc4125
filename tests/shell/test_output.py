"""Where output goes: data to the screen or an output file in its format, status never into the data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tdbql.shell.output as output
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import Span
from tdbql.shell.output import ShellState, Shown, emit, open_sink, shown_for
from tdbql.shell.session import StatementResult

TABLE = pa.table({"a": [1, 2], "b": ["x", "y"]})


@pytest.fixture
def terminal(monkeypatch, capsys):
    """stdout is a 40 x 10 terminal; what would be paged is collected."""
    paged = []
    monkeypatch.setattr(output.pydoc, "pager", paged.append)
    monkeypatch.setattr(output.shutil, "get_terminal_size", lambda fallback=None: SimpleNamespace(lines=10, columns=40))
    monkeypatch.setattr(output, "stdout_is_terminal", lambda: True)
    return paged


def test_long_output_is_paged_and_short_output_printed(terminal, capsys):
    state = ShellState(session=None)
    long_text = "\n".join(str(i) for i in range(30))
    emit(state, long_text)
    emit(state, "x" * 50)
    emit(state, "short")
    assert terminal == [long_text, "x" * 50]
    assert capsys.readouterr().out == "short\n"
    state.pager = False
    emit(state, long_text)
    assert len(terminal) == 2


def test_a_wide_table_fits_the_terminal_instead_of_paging(terminal, capsys):
    state = ShellState(session=None)
    emit(state, Shown(table=pa.table({f"column_{i}": [i] for i in range(10)})))
    assert terminal == []
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()[:3]) <= 40 and "hidden to fit the width" in out


def test_status_follows_a_table_on_screen_and_goes_to_stderr_otherwise(capsys, tmp_path):
    state = ShellState(session=None, pager=False)
    emit(state, Shown(table=TABLE, status="2 rows\nRun Time: 0.001 s"))
    captured = capsys.readouterr()
    assert captured.out.endswith("(2 rows)\n2 rows\nRun Time: 0.001 s\n") and captured.err == ""
    state.mode = "csv"
    emit(state, Shown(table=TABLE, status="target: x"))
    captured = capsys.readouterr()
    assert captured.out == "a,b\n1,x\n2,y\n" and captured.err == "target: x\n"
    state.mode = "table"
    state.output = open_sink(tmp_path / "out.txt")
    emit(state, Shown(table=TABLE, status="Run Time: 0.002 s"))
    emit(state, Shown(status="1 prompt"))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "Run Time: 0.002 s\n1 prompt\n"
    assert "Run Time" not in (tmp_path / "out.txt").read_text() and "(2 rows)" in (tmp_path / "out.txt").read_text()


@pytest.mark.parametrize("name", ["out.csv", "out.json", "out.jsonl", "out.md", "out.parquet"])
def test_the_file_extension_picks_the_format(tmp_path, name, capsys):
    state = ShellState(session=None)  # the mode stays table
    path = tmp_path / name
    state.output = open_sink(path)
    emit(state, Shown(table=TABLE, status="2 rows"))
    if name.endswith(".parquet"):
        assert pq.read_table(path).equals(TABLE)
        with pytest.raises(TdbqlError, match="holds one table"):
            emit(state, Shown(table=TABLE))
        return
    text = path.read_text()
    expected = {"out.csv": "a,b\n1,x\n2,y\n", "out.md": "| a | b |\n| --- | --- |\n| 1 | x |\n| 2 | y |\n"}
    if name in expected:
        assert text == expected[name]
    elif name == "out.json":
        assert json.loads(text) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    else:
        assert [json.loads(line) for line in text.splitlines()] == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert capsys.readouterr().out == ""


def test_once_takes_the_next_result_only(tmp_path, capsys):
    state = ShellState(session=None, mode="csv")
    state.once = open_sink(tmp_path / "one.json")
    emit(state, Shown(status="target: x"))  # status is not a result: the file waits
    emit(state, Shown(table=TABLE))
    emit(state, Shown(table=pa.table({"c": [3]})))
    assert json.loads((tmp_path / "one.json").read_text()) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert state.once is None
    assert capsys.readouterr().out == "c\n3\n"


def test_parquet_needs_a_file(capsys):
    state = ShellState(session=None, mode="parquet")
    with pytest.raises(TdbqlError, match="parquet is written to a file"):
        emit(state, Shown(table=TABLE))
    emit(state, Shown(data="prompts\ntokens", status="ok"))  # text still shows
    captured = capsys.readouterr()
    assert captured.out == "prompts\ntokens\n" and captured.err == "ok\n"


def test_an_unwritable_output_file_is_an_error(tmp_path):
    with pytest.raises(TdbqlError, match="cannot write"):
        open_sink(tmp_path / "no" / "such" / "dir.csv")


def test_a_result_shows_its_table_as_data_and_its_message_as_status():
    span = Span(line=1, column=1, end_line=1, end_column=2, start_pos=0, end_pos=1)
    result = StatementResult(statement=None, span=span, text="topk 1 act", table=TABLE, message="tables: a",
                             elapsed_ms=1234.0)
    shown = shown_for(result, timer=True)
    assert (shown.table, shown.data, shown.status) == (TABLE, "", "tables: a\nRun Time: 1.234 s")
    assert ShellState(session=None, mode="csv").text(shown) == "a,b\n1,x\n2,y\ntables: a\nRun Time: 1.234 s"
    plan = StatementResult(statement=None, span=span, text="explain topk 1 act", message="plan: ...")
    assert shown_for(plan, timer=False) == Shown(data="plan: ...")
    assert not shown_for(StatementResult(statement=None, span=span, text="x"), timer=False).has_data
