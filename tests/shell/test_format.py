"""Output formats: exports round-trip exactly; the table view limits rows and says so."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from tdbql.query.plan import Span
from tdbql.shell.format import FORMATS, ProgressBar, format_cell, format_table, render_result
from tdbql.shell.session import StatementResult


def node_table(n: int = 5) -> pa.Table:
    return pa.table({
        "prompt_id": pa.array([0] * n, pa.int64()),
        "layer": pa.array(list(range(n)), pa.int64()),
        "component": ["mlp" if i % 2 else "attn" for i in range(n)],
        "unit": pa.array([10 * i for i in range(n)], pa.int64()),
        "token": [f" tok{i}" for i in range(n)],
        "act_times_grad": [0.5 / (i + 1) - 0.1 for i in range(n)],
    })


def test_csv_round_trips_every_row():
    table = node_table(7)
    text = format_table(table, "csv", max_rows=2)  # exports ignore the row limit
    back = pacsv.read_csv(io.BytesIO(text.encode()), convert_options=pacsv.ConvertOptions(
        column_types=table.schema, strings_can_be_null=False))
    assert back.equals(table)


def test_json_round_trips_and_nan_becomes_null():
    table = pa.table({"x": [1.5, float("nan"), None], "s": ["a", "b|c", None]})
    rows = json.loads(format_table(table, "json"))
    assert rows == [{"x": 1.5, "s": "a"}, {"x": None, "s": "b|c"}, {"x": None, "s": None}]


def test_table_mode_limits_rows_and_reports_the_total():
    table = node_table(12)
    text = format_table(table, "table", max_rows=5)
    assert "(12 rows, 5 shown" in text
    assert "act_times_grad" in text.splitlines()[0]
    body = [line for line in text.splitlines() if "mlp" in line or "attn" in line]
    assert len(body) == 5
    assert format_table(table, "table", max_rows=None).endswith("(12 rows)")


def test_table_mode_shows_token_spaces():
    text = format_table(node_table(2), "table")
    assert "' tok0'" in text


def test_markdown_has_header_separator_and_escaped_pipes():
    table = pa.table({"a": [1, 2], "b": ["x|y", "z"]})
    lines = format_table(table, "markdown").splitlines()
    assert lines[0] == "| a | b |"
    assert lines[1] == "| --- | --- |"
    assert lines[2] == "| 1 | x\\|y |"
    assert len(lines) == 4


def test_format_cell():
    assert format_cell(None) == "NULL"
    assert format_cell(0.123456789) == "0.1235"
    assert format_cell(float("nan")) == "nan"
    assert format_cell([1.0, 2.5]) == "[1, 2.5]"
    assert format_cell(7) == "7"


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="unknown format"):
        format_table(node_table(1), "xml")
    assert set(FORMATS) == {"table", "csv", "json", "markdown"}


def test_render_result_joins_table_message_and_timer():
    span = Span(line=1, column=1, end_line=1, end_column=2, start_pos=0, end_pos=1)
    result = StatementResult(statement=None, span=span, text="x", table=pa.table({"a": [1]}),
                             message="tables: a", elapsed_ms=1234.0)
    text = render_result(result, mode="csv", timer=True)
    assert text == "a\n1\ntables: a\nRun Time: 1.234 s"
    assert render_result(StatementResult(statement=None, span=span, text="x")) == ""


def test_progress_bar_is_silent_when_disabled_or_single_batch(capsys):
    bar = ProgressBar(enabled=False)
    bar(1, 10)
    ProgressBar(enabled=True)(1, 1)
    assert capsys.readouterr().err == ""


def test_progress_bar_runs_and_closes_for_multi_batch_work():
    bar = ProgressBar(enabled=True)
    bar(1, 3)
    assert bar._progress is not None
    bar(3, 3)
    assert bar._progress is None
