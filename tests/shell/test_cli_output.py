"""The real `tdbql` command's output: machine formats hold only data, files get only data, scripts
read their options, and bad input is a one-line error."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time

import pyarrow.parquet as pq
import pytest

IOI = "When Mary and John went to the store, John gave a drink to"
SETUP = f'prompt "{IOI}"\ntarget " Mary" vs " John"\n'


def run(tdbql_bin, args, env, cwd):
    return subprocess.run([tdbql_bin, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_machine_formats_keep_status_lines_off_stdout(tdbql_bin, tiny_model_dir, cli_env, tmp_path, fmt):
    proc = run(tdbql_bin, ["--model", str(tiny_model_dir), "--format", fmt, "-c",
                           SETUP + "topk 5 act_times_grad as top\n.timer on\nselect count(*) as n from top;"],
               cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 prompt" in proc.stderr and "target: logit" in proc.stderr and "Run Time:" in proc.stderr
    out = proc.stdout
    assert "prompt" not in out.replace("prompt_id", "") and "Run Time" not in out
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(out)))
        assert rows[0][:3] == ["prompt_id", "layer", "component"] and len(rows) == 1 + 5 + 2
        assert rows[6:] == [["n"], ["5"]]
    elif fmt == "json":
        first, second = out.splitlines()
        assert len(json.loads(first)) == 5 and json.loads(second) == [{"n": 5}]
    else:
        records = [json.loads(line) for line in out.splitlines()]
        assert len(records) == 6 and records[-1] == {"n": 5}


def test_parquet_goes_to_a_file_only(tdbql_bin, cli_env, tmp_path):
    proc = run(tdbql_bin, ["--format", "parquet", "-o", "t.parquet", "-c", "select 1 as a, 'x' as b;"], cli_env,
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and pq.read_table(tmp_path / "t.parquet").to_pylist() == [{"a": 1, "b": "x"}]
    proc = run(tdbql_bin, ["--format", "parquet", "-c", "select 1 as a;"], cli_env, tmp_path)
    assert proc.returncode == 1 and "parquet is written to a file" in proc.stderr and "Traceback" not in proc.stderr


def test_output_once_and_timer_write_only_data_into_files(tdbql_bin, cli_env, tmp_path):
    script = tmp_path / "job.tql"
    script.write_text(".timer on\n.output all.csv\nselect 1 as a;\ncreate table t as select 2 as b;\n"
                      ".once one.json\nselect 3 as c;\nselect 4 as d;\n.output\n.once rows.jsonl\n"
                      "select * from range(2) r(i);\nselect 5 as e;\n")
    proc = run(tdbql_bin, ["-f", str(script)], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "all.csv").read_text() == "a\n1\nd\n4\n"
    assert json.loads((tmp_path / "one.json").read_text()) == [{"c": 3}]
    assert (tmp_path / "rows.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n'
    assert "e" in proc.stdout and "(1 row)" in proc.stdout and "Run Time" in proc.stdout
    assert proc.stderr.count("Run Time") == 5  # the statements whose data went to a file


@pytest.mark.parametrize("how", ["-f", "-c", ".read"])
def test_plot_options_survive_every_script_context(tdbql_bin, cli_env, tmp_path, how):
    body = ("create table t as select range as layer, range * 2.0 - 3 as v from range(4);\n"
            ".plot t --to x.png --kind bars --value v   -- a comment after the options\n")
    (tmp_path / "plot.tql").write_text(body)
    (tmp_path / "outer.tql").write_text(".read plot.tql\n")
    args = {"-f": ["-f", "plot.tql"], "-c": ["-c", body], ".read": ["-f", "outer.tql"]}[how]
    proc = run(tdbql_bin, args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote x.png (bars: 4 rows)" in proc.stdout
    assert not (tmp_path / "t.png").exists()


def test_an_error_in_a_read_file_names_that_file_and_keeps_its_output(tdbql_bin, cli_env, tmp_path):
    (tmp_path / "inner.tql").write_text("select 1 as first;\n\nselect * from nowhere;\nselect 3 as never;\n")
    (tmp_path / "outer.tql").write_text("select 0 as before;\n.read inner.tql\nselect 4 as after;\n")
    proc = run(tdbql_bin, ["--format", "csv", "-f", "outer.tql"], cli_env, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("inner.tql:3:1: SQL error")
    assert proc.stdout == "before\n0\nfirst\n1\n"
    (tmp_path / "loop.tql").write_text(".read loop.tql\n")
    proc = run(tdbql_bin, ["-f", "loop.tql"], cli_env, tmp_path)
    assert proc.returncode == 1 and "nested more than 32 deep" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, message", [(b"select 1;\n\xff\xfe bad\n", "not UTF-8 text (byte 0xff at offset 10)"),
                                              (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "it is a binary file")])
def test_a_file_that_is_not_text_is_a_one_line_error(tdbql_bin, cli_env, tmp_path, content, message):
    (tmp_path / "bad.tql").write_bytes(content)
    (tmp_path / "outer.tql").write_text("select 1 as ok;\n.read bad.tql\n")
    for args in (["-f", "bad.tql"], ["-f", "outer.tql"]):
        proc = run(tdbql_bin, args, cli_env, tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert message in proc.stderr and proc.stderr.count("\n") <= 3  # the message, and for .read its line


def test_range_checked_maxrows_and_unrepresentable_values(tdbql_bin, cli_env, tmp_path):
    proc = run(tdbql_bin, ["-c", ".maxrows 99999999999999999999"], cli_env, tmp_path)
    assert proc.returncode == 1 and "from 1 to 1000000000" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(tdbql_bin, ["--max-rows", "99999999999999999999", "-c", "select 1;"], cli_env, tmp_path)
    assert proc.returncode == 2
    proc = run(tdbql_bin, ["-c", "select 'infinity'::timestamp as t, '-infinity'::date as d;"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"infinity\s+-infinity", proc.stdout)


def test_a_huge_cell_renders_quickly(tdbql_bin, cli_env, tmp_path):
    started = time.perf_counter()
    proc = run(tdbql_bin, ["-c", "select repeat('x', 100000000) as big, 1 as n;"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "…(+99999800 chars)" in proc.stdout and len(proc.stdout) < 2000
    assert time.perf_counter() - started < 60
