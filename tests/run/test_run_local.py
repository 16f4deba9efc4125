"""`tdbql run --engine local` against one process: the same queries over the same prompts in a
Session (`prompts from` the dataset as one file) give the same tables, bit for bit, for every
way a table combines across shards (batches are the same: the batch size divides the shard size).
Then resuming, refusals, bad input, explain, attaching, and the CLI."""

from __future__ import annotations

import json
import subprocess
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tdbql.query.errors import TdbqlError
from tdbql.shell.run.driver import RunOptions, run_dataset
from tdbql.shell.session import Session

from .conftest import BATCH, SHARD_ROWS, session_tables, tables_of, write_query

QUERIES = {
    "top": "topk 20 act_times_grad as top",
    "low": "bottomk 3 act_times_grad of mlp, head by layer as low",
    "per_prompt": "topk 2 act_times_grad of mlp by prompt as per_prompt",
    "heads": "select act of head where layer = 1 and token = -1 as heads",
    "next": "logits where token = -1 topk 5 as next",
    "mean_act": "topk 10 act of mlp where token = -1 over prompts mean as mean_act",
    "max_attn": "topk 8 act of attn where layer = 2 over prompts max by token as max_attn",
    "sum_heads": "select act_times_grad of head over prompts sum as sum_heads",
    "m": "metric over prompts mean as m",
    "per_m": "metric ablate attn[3,1]=0 as per_m",
    "sweep": "patching of head from clean by position where layer = 3 and token in (-2, -1) over prompts mean "
             "as sweep",
    "lens": "logit_lens where token = -1 topk 3 as lens",
}


# The lens batches prompts by a budget of padded tokens, not by `batch_size`, so next to a shard's
# edge its batches are not one process's, and padding to another length moves a float's last bits.
TOKEN_BUDGET = {"lens"}


def assert_close(got: pa.Table, expected: pa.Table, rtol: float = 1e-5) -> None:
    """Equal but for the float columns, which agree to `rtol`."""
    assert got.schema == expected.schema and got.num_rows == expected.num_rows
    for name in got.column_names:
        a, b = got.column(name), expected.column(name)
        if pa.types.is_floating(a.type):
            assert np.allclose(a.to_numpy(), b.to_numpy(), rtol=rtol, atol=1e-6), name
        else:
            assert a.equals(b), name


def run(tmp_path, query: str, dataset, **options) -> tuple:
    path = write_query(tmp_path, f"set batch_size = {BATCH}\n{query}\n")
    out = tmp_path / options.pop("out", "out")
    summary = run_dataset(RunOptions(query_file=str(path), prompts=str(dataset), out=str(out),
                                     shard_rows=options.pop("shard_rows", SHARD_ROWS), **options))
    return out, summary


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("local")
    started = time.perf_counter()
    out, summary = run(tmp, "\n".join(QUERIES.values()), dataset)
    return out, summary, time.perf_counter() - started


def test_every_table_equals_the_one_process_answer(local_run, dataset):
    out, summary, _ = local_run
    expected = session_tables(dataset, list(QUERIES.values()), QUERIES)
    got = tables_of(out, QUERIES)
    for name in QUERIES:
        assert expected[name].num_rows > 0, name
        if name in TOKEN_BUDGET:
            assert_close(got[name], expected[name])
        else:
            assert got[name].equals(expected[name]), name
    assert summary.shards == 3 and summary.computed == 3 and summary.prompts == 160
    assert summary.tables["top"] == 20 and summary.retried == 0


def test_the_prompt_set_keeps_extra_columns_and_global_ids(local_run, dataset, rows):
    out, _, _ = local_run
    con = duckdb.connect()
    from tdbql.shell.run.attach import attach_run

    attach_run(con, out)
    got = con.sql("SELECT prompt_id, text, template, pair FROM prompts ORDER BY prompt_id").fetchall()
    assert got == [(i, r["prompt"], r["template"], str(r["pair"])) for i, r in enumerate(rows)]
    tokens = con.sql("SELECT count(*), count(DISTINCT prompt_id) FROM tokens").fetchall()[0]
    assert tokens[1] == 160 and tokens[0] == con.sql("SELECT sum(n_tokens) FROM prompts").fetchall()[0][0]


def test_manifest_records_query_model_versions_and_shards(local_run):
    out, _, _ = local_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["model"] == "default"
    assert manifest["versions"]["torch"] and "act_times_grad" in manifest["query"]
    assert sorted(int(k) for k in manifest["shards"]) == [0, 1, 2]
    assert [manifest["shards"][str(i)]["prompts"] for i in range(3)] == [64, 64, 32]
    assert manifest["tables"]["top"]["merge"] == "topk" and manifest["tables"]["top"]["files"] == ["top/merged.parquet"]
    assert manifest["tables"]["next"]["files"] == [f"next/shard-0000{i}.parquet" for i in range(3)]
    assert manifest["tables"]["top"]["plan"]["query"]["k"] == 20


def test_a_rerun_of_a_complete_run_computes_nothing(local_run, dataset, tmp_path):
    out, _, _ = local_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.parquet")}
    path = write_query(out.parent, f"set batch_size = {BATCH}\n" + "\n".join(QUERIES.values()) + "\n")
    summary = run_dataset(RunOptions(query_file=str(path), prompts=str(dataset), out=str(out), shard_rows=SHARD_ROWS))
    assert summary.computed == 0 and summary.committed_before == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.parquet")} == before


def test_an_interrupted_run_resumes_with_only_the_missing_shards(tmp_path, dataset):
    query = "topk 20 act_times_grad as top\nlogits where token = -1 topk 3 as next"
    seen = []

    def interrupt(done, total):
        seen.append(done)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, query, dataset, progress=interrupt)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["0", "1"] and not manifest["complete"]
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "next").iterdir()}
    stray = tmp_path / "out" / "next" / "shard-00002.parquet"  # a shard written but never committed
    pq.write_table(pq.read_table(tmp_path / "out" / "next" / "shard-00000.parquet"), stray)
    with pytest.raises(TdbqlError, match="not complete"):
        tables_of(tmp_path / "out", ["next"])
    _, summary = run(tmp_path, query, dataset)
    assert (summary.computed, summary.committed_before) == (1, 2)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    whole, _ = run(tmp_path, query, dataset, out="whole")
    assert tables_of(tmp_path / "out", ["top", "next"]) == tables_of(whole, ["top", "next"])
    ids = duckdb.connect()
    from tdbql.shell.run.attach import attach_run

    attach_run(ids, tmp_path / "out")
    assert ids.sql("SELECT count(*), count(DISTINCT prompt_id) FROM next").fetchall() == [(160 * 3, 160)]


@pytest.mark.parametrize("query, message", [
    ("topk 5 act_times_grad verify", "verify runs each ranked node"),
    ("topk 5 act ablate mlp[1,2]=mean", "averages over the whole prompt set"),
    ("topk 5 act where prompt = 3", "choose the prompts in the dataset"),
    ("generate 3 temperature 0.5 seed 1", "sampled generation"),
    ("upvoted mlp[1,2] raw", "reads the weights"),
    ("select * from prompts;", "SQL runs after a run"),
    ("prompt \"a b\"", "reads its prompts from --prompts"),
    ("topk 5 act as prompts", "keeps for itself"),
    ("topk 5 act\nset batch_size = 4", "come before the queries"),
    ("topk 5 act as t\nlogits as t", "two queries write table t"),
])
def test_what_a_run_cannot_combine_is_refused_before_it_starts(tmp_path, dataset, query, message):
    with pytest.raises(TdbqlError, match=message) as info:
        run(tmp_path, query, dataset)
    assert info.value.line is not None
    assert not (tmp_path / "out").exists()


def test_bad_input_is_a_clear_error(tmp_path, dataset):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TdbqlError, match="has no rows"):
        run(tmp_path, "topk 5 act", tmp_path / "empty.jsonl")
    pq.write_table(pa.table({"question": ["a"]}), tmp_path / "q.parquet")
    with pytest.raises(TdbqlError, match="has no 'prompt'"):
        run(tmp_path, "topk 5 act", tmp_path / "q.parquet")
    with pytest.raises(TdbqlError, match="layer 9 is out of range") as info:
        run(tmp_path, "topk 5 act where layer = 9", dataset)
    assert "no shard was committed in" in info.value.message
    small = tmp_path / "small.jsonl"
    small.write_text("".join(line + "\n" for line in (dataset.parent / "all.jsonl").read_text().splitlines()[:3]))
    _, summary = run(tmp_path, "logits where token = -1 topk 1", small)  # the folder the failed run left empty
    assert summary.computed == 1
    with pytest.raises(TdbqlError, match="holds a run of another query file"):
        run(tmp_path, "logits where token = -1 topk 2", small)


def malformed_dataset(folder, rows):
    folder.mkdir()
    lines = [json.dumps(r) for r in rows[:100]]
    lines[70] = "{broken"
    lines[80] = json.dumps({**rows[80], "target": " Maryanne Smith"})
    (folder / "d.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_a_malformed_row_stops_the_run_and_keeps_committed_shards(tmp_path, rows):
    data = malformed_dataset(tmp_path / "data", rows)
    with pytest.raises(TdbqlError) as info:
        run(tmp_path, "logits where token = -1 topk 2 as next", data)
    message = info.value.message
    assert "d.jsonl:71: malformed row: not valid JSON" in message and "--on-error stop" in message
    assert "1 of 2 shards committed" in message
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["0"]


def test_on_error_skip_leaves_malformed_rows_out_and_lists_them(tmp_path, rows):
    data = malformed_dataset(tmp_path / "data", rows)
    out, summary = run(tmp_path, "logits where token = -1 topk 2 as next", data, on_error="skip")
    assert [(s["where"].rsplit("/", 1)[1], s["error"][:30]) for s in summary.skipped_rows] == [
        ("d.jsonl:71", "not valid JSON (Expecting prop"), ("d.jsonl:81", "target ' Maryanne Smith' is 6 ")]
    assert "2 malformed rows skipped (first: " in summary.line()
    ids = [r[0] for r in duckdb.connect().sql(
        f"SELECT DISTINCT prompt_id FROM read_parquet('{out}/next/*.parquet') ORDER BY 1").fetchall()]
    assert ids == [i for i in range(100) if i not in (70, 80)]


def test_explain_shows_shards_batch_size_and_memory_per_worker(tmp_path, dataset):
    from tdbql.shell.run.explain import explain_run

    path = write_query(tmp_path, f"set batch_size = {BATCH}\n{QUERIES['top']}\n{QUERIES['m']}\n")
    text = explain_run(RunOptions(query_file=str(path), prompts=str(dataset), out=str(tmp_path / "o"),
                                  engine="ray", workers=2, shard_rows=SHARD_ROWS))
    assert "160 prompts; 3 shards of up to 64 prompts" in text
    assert "engine: ray at a local Ray started with this machine's cores, 2 workers" in text
    assert f"batches of {BATCH} prompts (set batch_size in the run file)" in text
    assert "at the peak" in text and "MiB" in text
    assert "query 1 (top): each shard's top k per group, ranked again over their union" in text
    assert "query 2 (m):" in text
    assert not (tmp_path / "o").exists()


def test_attach_meta_command_and_cli_db(local_run, dataset, tmp_path, tdbql_bin, cli_env):
    out, _, _ = local_run
    from tdbql.shell.meta import ShellState, run_meta

    session = Session(db=str(tmp_path / "x.duckdb"))
    try:
        session.execute("prompt \"When Mary and John went to the store, John gave a drink to\"")
        message = run_meta(ShellState(session=session), f".open {out}")
        assert "run_prompts" in message and "top (20 rows)" in message
        got = session.execute("select count(*) as n from top t join run_prompts p using (prompt_id)")[0].table
        assert got.column("n").to_pylist() == [20]
        assert session.con.sql("select count(*) from prompts").fetchall() == [(1,)]  # the session's own
    finally:
        session.close()
    query = write_query(tmp_path, f"set batch_size = {BATCH}\n{QUERIES['next']}\n", "cli.tql")
    data = tmp_path / "small.jsonl"
    data.write_text("".join(line + "\n" for line in (dataset.parent / "all.jsonl").read_text().splitlines()[:20]))
    db = tmp_path / "cli.duckdb"
    proc = subprocess.run([tdbql_bin, "run", "-f", str(query), "--prompts", str(data), "--out",
                           str(tmp_path / "cli_out"), "--db", str(db)], capture_output=True, text=True, env=cli_env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "run: 20 prompts in 1 of 1 shards" in proc.stderr and "attached" in proc.stderr
    proc = subprocess.run([tdbql_bin, "--db", str(db), "-c", "select count(*) as n from next join prompts "
                           "using (prompt_id);", "--format", "csv"], capture_output=True, text=True, env=cli_env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["n", "100"], proc.stderr


def test_attach_statement_attaches_a_run_folder_and_leaves_duckdb_attach_alone(local_run, tmp_path):
    """`attach 'OUT'` (or `attach OUT;`) names a folder, which DuckDB's ATTACH cannot open: it
    attaches the run; a database file, or an alias, is DuckDB's own ATTACH."""
    out, _, _ = local_run
    session = Session()
    try:
        message = session.execute(f"attach '{out}';")[0].message
        assert message.startswith(f"attached 15 views from {out}: prompts (160 rows)")
        assert session.con.sql("select count(*) from top").fetchall() == [(20,)]
        session.execute(f"attach {out}/;")
        session.execute(f"attach '{tmp_path / 'other.duckdb'}' as other; create table other.t as select 1 as x;")
        assert session.con.sql("select x from other.t").fetchall() == [(1,)]
        with pytest.raises(TdbqlError, match="is not a tdbql run folder"):
            session.execute(f"attach '{tmp_path}';")
    finally:
        session.close()


def test_the_local_run_module_stays_fast(local_run):
    _, _, seconds = local_run
    print(f"local run of {len(QUERIES)} queries over 160 prompts: {seconds:.1f} s")
    assert seconds < 240


def test_progress_shows_prompts_done_prompts_per_second_and_an_eta():
    import io
    import re

    from rich.console import Console
    from tdbql.shell.run.cli import RunProgress

    buffer = io.StringIO()
    progress = RunProgress(True, console=Console(file=buffer, force_terminal=True, width=100))
    for done in (32, 64, 96):
        time.sleep(0.2)
        progress(done, 160)
    time.sleep(0.2)  # one refresh of the bar
    progress.close()
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).split("\r")[-2]
    assert re.search(r"96/160 +\d+\.\d prompts/s ETA 0:00:0\d", last), last
