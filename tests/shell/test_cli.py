"""The `tdbql` command: saved files with -D through the console script, exit codes, formats."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pytest
from tdbql.shell.cli import main

IOI = "When Mary and John went to the store, John gave a drink to"


def run_tdbql(tdbql_bin: str, args: list[str], env: dict[str, str], cwd, stdin: str | None = None):
    return subprocess.run([tdbql_bin, *args], env=env, cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_saved_file_with_param_writes_the_database(tdbql_bin, tiny_model_dir, cli_env, tmp_path):
    script = tmp_path / "ioi.tql"
    script.write_text(
        "-- a saved analysis\n"
        f'prompt "{IOI}"\n'
        'target " Mary" vs " John"\n'
        "topk $k act_times_grad of mlp as neurons   -- k comes from -D\n"
        "select count(*) as n from neurons;\n"
    )
    db = tmp_path / "runs.duckdb"
    proc = run_tdbql(tdbql_bin, ["--model", str(tiny_model_dir), "--db", str(db), "-D", "k=6", "--format", "csv",
                                 "-f", str(script)], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("n\n6")
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.sql("SELECT count(*) FROM neurons").fetchall() == [(6,)]
        assert con.sql("SELECT DISTINCT component FROM neurons").fetchall() == [("mlp",)]
        assert con.sql("SELECT text FROM prompts").fetchall() == [(IOI,)]
        [(text, table_name)] = con.sql("SELECT text, table_name FROM queries").fetchall()
        assert text == "topk 6 act_times_grad of mlp as neurons"
        assert table_name == "neurons"


def test_bad_line_exits_1_with_position_and_keeps_earlier_results(tdbql_bin, tiny_model_dir, cli_env, tmp_path):
    script = tmp_path / "bad.tql"
    script.write_text(f'prompt "{IOI}"\ntopk 3 act as kept\n\ntopk 3 act where layer = 99\ntopk 3 act as skipped\n')
    db = tmp_path / "runs.duckdb"
    proc = run_tdbql(tdbql_bin, ["--model", str(tiny_model_dir), "--db", str(db), "-f", str(script)], cli_env,
                     tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{script}:4:")
    assert "Traceback" not in proc.stderr
    assert "(3 rows)" in proc.stdout  # the statement before the error was shown
    with duckdb.connect(str(db), read_only=True) as con:
        names = {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "kept" in names and "skipped" not in names


def test_c_runs_sql_without_loading_a_model(capsys):
    assert main(["--model", "no-such-model", "-c", "select 42 as x;", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "x\n42\n"


def test_c_and_f_run_in_order(tmp_path, capsys):
    script = tmp_path / "make.tql"
    script.write_text("create table t as select 1 as a;\n")
    code = main(["-f", str(script), "-c", "insert into t values (2);", "-c", "select sum(a) as s from t;",
                 "--format", "json"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[-1]) == [{"s": 3}]


def test_syntax_error_in_c_names_the_command(capsys):
    assert main(["-c", "select 1;\ntopk three act"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("<command>:2:")
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "-c", "select * from nowhere;"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_missing_file_is_a_query_error(tmp_path, capsys):
    assert main(["-f", str(tmp_path / "nope.tql")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--format", "xml"], ["-D", "novalue"], ["--batch-size", "0"], ["--bogus"]])
def test_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as info:
        main([*args, "-c", "select 1;"])
    assert info.value.code == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("tdbql ")


def test_stdin_is_read_when_not_a_terminal(tdbql_bin, cli_env, tmp_path):
    proc = run_tdbql(tdbql_bin, ["--format", "markdown"], cli_env, tmp_path, stdin="select 7 as seven;\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:3] == ["| seven |", "| --- |", "| 7 |"]


def test_safe_flag_blocks_file_reads(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert main(["--safe", "-c", f"select * from read_csv('{tmp_path / 'x.csv'}');"]) == 1
    assert "disabled" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tdbql.shell.cli", "-c", "select 1 as one;", "--format", "csv"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "one\n1\n"


def test_meta_commands_run_inside_files(tmp_path, capsys):
    script, out = tmp_path / "job.tql", tmp_path / "out.csv"
    script.write_text(f".param n 5\n.mode csv\nselect $n as n;  -- from .param\n.output {out}\nselect 6 as m;\n.quit\nselect nope;\n")
    assert main(["-f", str(script)]) == 0
    assert capsys.readouterr().out == "n\n5\n"  # settings are not echoed into the CSV
    assert out.read_text() == "m\n6\n"


def test_bad_meta_line_in_a_file_exits_1_with_its_position(tmp_path, capsys):
    script = tmp_path / "bad.tql"
    script.write_text("select 1 as one;\n.mode xml\nselect 2 as two;\n")
    assert main(["-f", str(script)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"{script}:2:1: ") and "xml" in captured.err
    assert "one" in captured.out and "two" not in captured.out


@pytest.mark.parametrize(
    "statement, message",
    [
        ("model '{dir}'", "loading a model from a local path is disabled in --safe mode"),
        ("sae mlp from '{dir}'", "loading autoencoders from a local path is disabled in --safe mode"),
        (".output {dir}/out.txt", ".output FILE is disabled in --safe mode"),
        (".read {dir}/job.tql", ".read is disabled in --safe mode"),
        (".plot", ".plot is disabled in --safe mode"),
    ],
)
def test_safe_mode_scripts_touch_no_files(tmp_path, capsys, statement, message):
    (tmp_path / "job.tql").write_text("select 1;\n")
    assert main(["--safe", "-c", statement.format(dir=tmp_path)]) == 1  # the default model
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists()
