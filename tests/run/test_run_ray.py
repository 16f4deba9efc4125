"""`tdbql run --engine ray` on a local Ray (2 CPUs, started once for the module): the same tables
as `--engine local`, bit for bit; a worker killed in the middle of a shard's commit is retried by
Ray with every row once in the output; an interrupted local run resumed on Ray computes only the
missing shards; an unreachable address is a clear error that keeps what was committed."""

from __future__ import annotations

import json
import time

import duckdb
import pytest
from tdbql.query.errors import TdbqlError
from tdbql.shell.run.attach import attach_run
from tdbql.shell.run.driver import RunOptions, run_dataset

from .conftest import BATCH, N_ROWS, SHARD_ROWS, tables_of, write_query

ray = pytest.importorskip("ray")

QUERY = "\n".join([
    f"set batch_size = {BATCH}",
    "topk 20 act_times_grad as top",
    "topk 2 act_times_grad of mlp by prompt as per_prompt",
    "logits where token = -1 topk 3 as next",
    "topk 10 act of mlp where token = -1 over prompts mean as mean_act",
    "metric over prompts mean as m",
])
TABLES = ["prompts", "tokens", "top", "per_prompt", "next", "mean_act", "m"]
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    TIMES["ray.init"] = time.perf_counter() - started
    yield
    started = time.perf_counter()
    ray.shutdown()
    print(f"\nray module: {', '.join(f'{k} {v:.1f} s' for k, v in TIMES.items())}")


def options(tmp_path, dataset, out: str, **kwargs) -> RunOptions:
    path = write_query(tmp_path, QUERY + "\n")
    return RunOptions(query_file=str(path), prompts=str(dataset), out=str(tmp_path / out), shard_rows=SHARD_ROWS,
                      **kwargs)


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("ray_local")
    started = time.perf_counter()
    run_dataset(options(tmp, dataset, "local"))
    TIMES["local run"] = time.perf_counter() - started
    return tables_of(tmp / "local", TABLES)


def test_ray_and_local_give_identical_tables(tmp_path, dataset, local_out):
    started = time.perf_counter()
    summary = run_dataset(options(tmp_path, dataset, "ray", engine="ray", workers=2))
    TIMES["ray run"] = time.perf_counter() - started
    assert (summary.engine, summary.workers, summary.computed) == ("ray", 2, 3)
    got = tables_of(tmp_path / "ray", TABLES)
    for name in TABLES:
        assert got[name].num_rows > 0 and got[name].equals(local_out[name]), name


def test_a_worker_killed_mid_shard_is_retried_and_no_row_is_lost_or_doubled(tmp_path, dataset, local_out):
    started = time.perf_counter()
    summary = run_dataset(options(tmp_path, dataset, "killed", engine="ray", workers=2), fault="kill:1")
    TIMES["ray run with a kill"] = time.perf_counter() - started
    assert summary.retried >= 1 and summary.computed == 3
    assert "failure retried" in summary.line() or "failures retried" in summary.line()
    con = duckdb.connect()
    attach_run(con, tmp_path / "killed")
    counts = con.sql("SELECT prompt_id, count(*) FROM next GROUP BY 1 ORDER BY 1").fetchall()
    assert counts == [(i, 3) for i in range(N_ROWS)]
    got = tables_of(tmp_path / "killed", TABLES)
    for name in TABLES:
        assert got[name].equals(local_out[name]), name


def test_an_interrupted_run_resumes_on_ray_with_only_the_missing_shards(tmp_path, dataset, local_out):
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dataset(options(tmp_path, dataset, "resumed", progress=interrupt))
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["0"]
    first = (tmp_path / "resumed" / "next" / "shard-00000.parquet").stat().st_mtime_ns
    summary = run_dataset(options(tmp_path, dataset, "resumed", engine="ray", workers=2))
    assert (summary.computed, summary.committed_before) == (2, 1)
    assert (tmp_path / "resumed" / "next" / "shard-00000.parquet").stat().st_mtime_ns == first
    got = tables_of(tmp_path / "resumed", TABLES)
    for name in TABLES:
        assert got[name].equals(local_out[name]), name


def test_an_unreachable_address_is_a_clear_error_and_keeps_committed_shards(tmp_path, dataset):
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dataset(options(tmp_path, dataset, "out", progress=interrupt))
    before = (tmp_path / "out" / "manifest.json").read_text()
    with pytest.raises(TdbqlError) as info:
        run_dataset(options(tmp_path, dataset, "out", engine="ray", address="ray://127.0.0.1:1"))
    assert "cannot reach a Ray cluster at ray://127.0.0.1:1" in info.value.message
    assert "1 of 3 shards committed" in info.value.message
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"] == json.loads(before)["shards"]
    with pytest.raises(TdbqlError, match="expected ray://HOST:PORT"):
        run_dataset(options(tmp_path, dataset, "out", engine="ray", address="nowhere"))
