"""Output formats: exports round-trip exactly; the table view limits rows and says so."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from tdbql.query.errors import TdbqlError
from tdbql.shell.format import (
    FORMATS,
    ProgressBar,
    format_cell,
    format_for_path,
    format_table,
)


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


def test_machine_formats_are_complete():
    """csv, json, jsonl and markdown: every row, every column (NULL ones too), no cell shortened."""
    table = node_table(60).append_column("empty", pa.array([None] * 60, pa.float64()))
    table = table.append_column("long", pa.array(["y" * 5000] * 60))
    assert len(format_table(table, "markdown", max_rows=5).splitlines()) == 62
    assert format_table(table, "markdown").splitlines()[0].count("|") == table.num_columns + 1
    records = [json.loads(line) for line in format_table(table, "jsonl", max_rows=5).splitlines()]
    assert len(records) == 60 and records[0]["empty"] is None and records[0]["long"] == "y" * 5000
    assert json.loads(format_table(table, "json")) == records
    assert format_table(table, "csv").splitlines()[0].endswith(",empty,long")

def test_format_cell():
    assert format_cell(None) == "NULL"
    assert format_cell(0.123456789) == "0.1235"
    assert format_cell(float("nan")) == "nan"
    assert format_cell([1.0, 2.5]) == "[1, 2.5]"
    assert format_cell(7) == "7"


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="unknown format"):
        format_table(node_table(1), "xml")
    assert set(FORMATS) == {"table", "line", "csv", "json", "jsonl", "markdown", "parquet"}
    with pytest.raises(TdbqlError, match="parquet is written to a file"):
        format_table(node_table(1), "parquet")


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


def ioi_nodes() -> pa.Table:
    """Ten rows as `topk 10 act_times_grad` gives them (columns and types of executor/arrow.py)."""
    rows = [("attn", 1, 0, 13, 1, " to", " Mary", 18.34), ("attn", 3, 1, 13, 9, " to", " John", 10.53),
            ("attn", 3, 3, 13, 9, " to", " John", 9.065), ("mlp", 0, 404, 3, None, " John", None, 7.265),
            ("mlp", 0, 81, 1, None, " Mary", None, 3.178), ("mlp_sae", 0, 465, 3, None, " John", None, 2.811),
            ("mlp", 0, 120, 3, None, " John", None, 2.555), ("attn", 1, 2, 13, 2, " to", " and", 2.433),
            ("embed", None, None, 1, None, " Mary", None, 2.359), ("mlp", 3, 251, 13, None, " to", None, 2.352)]
    component, layer, unit, position, attended, token, attended_token, value = zip(*rows)
    int64 = pa.int64()
    return pa.table({
        "prompt_id": pa.array([0] * 10, int64), "layer": pa.array(layer, int64), "component": component,
        "unit": pa.array(unit, int64), "position": pa.array(position, int64), "attended": pa.array(attended, int64),
        "token": token, "attended_token": attended_token, "rank": pa.array(range(1, 11), int64),
        "act_times_grad": pa.array(value, pa.float64()),
        "grad": pa.array([None] * 10, pa.float64()),
    })


def test_node_table_leads_with_node_id_tokens_and_value():
    lines = format_table(ioi_nodes(), "table", width=80).splitlines()
    assert lines[0].split() == ["node", "tokens", "act_times_grad", "prompt_id", "rank"]
    assert lines[2].split("  ")[0] == "attn[1,0]@13→1"
    assert "' to'→' Mary'" in lines[2] and lines[2].split()[-3] == "18.34"
    assert lines[5].startswith("mlp[0,404]@3 ") and "' John'" in lines[5]
    assert lines[10].startswith("embed@1 ")
    assert lines[-2] == "(10 rows)"
    assert lines[-1] == "(NULL in every row: grad)"
    assert max(len(line) for line in lines) <= 80


@pytest.mark.parametrize("width", [80, 60, 40, 30])
def test_a_node_table_fits_the_width_and_keeps_its_value(width):
    text = format_table(ioi_nodes(), "table", width=width)
    body = text.split("\n(")[0].splitlines()
    assert max(len(line) for line in body) <= max(width, len("mlp_sae[0,465]@3  act_times_grad"))
    assert body[0].split()[:1] == ["node"] and "act_times_grad" in body[0]
    assert "18.34" in body[2]
    flat = " ".join(text.split())
    if width < 60:
        assert "hidden to fit the width: " in flat and "\\x or .mode line" in flat


def test_a_wide_plain_table_hides_trailing_columns_and_shortens_text():
    table = pa.table({"a": [1], "note": ["z" * 300], **{f"c{i}": [i * 1.5] for i in range(12)}})
    text = format_table(table, "table", width=60)
    body = text.split("\n(")[0].splitlines()
    assert max(len(line) for line in body) <= 60
    assert body[0].split()[:2] == ["a", "note"]
    assert "…" in body[2]
    hidden = text.split("hidden to fit the width: ")[1].split(";")[0].split(", ")
    assert hidden[-1] == "c11" and set(body[0].split()) | set(hidden) == set(table.column_names)


def test_no_width_gives_the_natural_table():
    text = format_table(node_table(3).append_column("wide", pa.array(["w" * 150] * 3)), "table")
    assert "w" * 150 in text and "hidden" not in text


def test_line_mode_and_expanded_show_every_column():
    text = format_table(ioi_nodes(), "line", max_rows=2)
    records = text.split("-[ row ")[1:]
    assert len(records) == 2 and text.endswith("(10 rows, 2 shown; use .mode csv or SQL LIMIT/OFFSET to see more)")
    names = [line.split(" = ")[0].strip() for line in records[0].splitlines()[1:] if " = " in line]
    assert names == ioi_nodes().column_names
    assert "attended_token = ' Mary'" in records[0] and "grad = NULL" in records[0]
    assert format_table(ioi_nodes(), "table", max_rows=2, expanded=True) == text


def test_a_huge_cell_is_capped_in_the_display_modes_only():
    table = pa.table({"big": ["x" * 10**8], "n": [1]})
    started = time.perf_counter()
    for mode in ("table", "line"):
        text = format_table(table, mode, width=80)
        assert len(text) < 2000 and "…(+" in text
    assert "x" * 200 + "…(+99999800 chars)" in format_table(table, "line")
    assert time.perf_counter() - started < 10
    assert len(format_table(pa.table({"big": ["x" * 10**6]}), "csv")) == 10**6 + 4


def test_infinite_timestamps_and_dates_render():
    con = duckdb.connect()
    table = con.sql("SELECT 'infinity'::timestamp AS t, '-infinity'::date AS d, "
                    "'2024-01-02'::date AS ok, 'infinity'::timestamptz AS tz").to_arrow_table()
    for mode in ("table", "line", "markdown"):
        text = format_table(table, mode)
        assert "infinity" in text and "-infinity" in text and "2024-01-02" in text
    assert format_table(table, "csv").splitlines()[1].startswith("infinity,-infinity,2024-01-02")
    assert json.loads(format_table(table, "json"))[0]["d"] == "-infinity"


@pytest.mark.parametrize("name, fmt", [("a.csv", "csv"), ("a.JSON", "json"), ("a.jsonl", "jsonl"),
                                       ("a.parquet", "parquet"), ("a.md", "markdown"), ("a.txt", None), ("a", None)])
def test_the_extension_picks_the_format(name, fmt):
    assert format_for_path(Path(name)) == fmt


def test_a_repeated_column_name_keeps_both_columns_in_every_mode():
    table = pa.table([pa.array([1]), pa.array([2])], names=["layer", "layer"])
    assert format_table(table).splitlines()[0].split() == ["layer", "layer_1"]
    assert json.loads(format_table(table, "json")) == [{"layer": 1, "layer_1": 2}]
    assert "layer_1 = 2" in format_table(table, "line")
    assert format_table(table, "csv").splitlines() == ["layer,layer", "1,2"]
