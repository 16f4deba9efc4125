"""Reading prompt datasets: files found, rows counted and read back by range, malformed rows
named by file and row, missing columns and empty datasets refused."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tdbql.query.errors import TdbqlError
from tdbql.shell.run.dataset import extra_schema, extras_table, find_files, read_range, scan
from tdbql.shell.run.shards import Shard, pieces, plan_shards


def scanned(dataset, stride=64):
    files, offset = [], 0
    for path in find_files(str(dataset / "*")):
        files.append(scan(path, stride, offset))
        offset += files[-1].rows
    return files


def test_glob_folder_and_file_find_the_same_files_in_sorted_order(dataset):
    by_glob = find_files(str(dataset / "*"))
    assert [p.name for p in by_glob] == ["a.jsonl", "b.parquet", "c.csv"]
    assert find_files(str(dataset)) == by_glob
    assert find_files(str(dataset / "b.parquet")) == [by_glob[1]]


def test_rows_are_counted_without_blank_lines(dataset):
    files = scanned(dataset)
    assert [f.rows for f in files] == [60, 70, 30]
    assert files[0].columns[:2] == ("prompt", "target")


@pytest.mark.parametrize("stride", [7, 64, 1000])
def test_any_range_reads_the_rows_of_the_whole_file(dataset, rows, stride):
    """Reading from a mark (a byte offset) gives the same rows as reading from the start."""
    files = scanned(dataset, stride)
    offset = 0
    for data in files:
        whole = [r.fields["prompt"] for r in read_range(data, 0, data.rows)]
        assert whole == [r["prompt"] for r in rows[offset:offset + data.rows]]
        for start in (0, 5, 31, 33, data.rows - 3):
            part = read_range(data, start, start + 9)
            assert [r.index for r in part] == list(range(start, min(start + 9, data.rows)))
            assert [r.fields["prompt"] for r in part] == whole[start:start + 9]
        offset += data.rows


def test_shards_span_files_and_cover_every_row_once(dataset):
    files = scanned(dataset)
    shards = plan_shards(files, 64)
    assert [(s.start, s.stop) for s in shards] == [(0, 64), (64, 128), (128, 160)]
    assert pieces(Shard(0, 0, 64), files) == [(0, 0, 60, 0), (1, 0, 4, 60)]
    assert pieces(Shard(2, 128, 160), files) == [(1, 68, 70, 128), (2, 0, 30, 130)]
    ids = [first + i for s in shards for _, start, stop, first in pieces(s, files) for i in range(stop - start)]
    assert ids == list(range(160))


def test_extra_columns_keep_one_type_per_column(dataset):
    files = scanned(dataset)
    schema = extra_schema(files)
    assert schema.names == ["template", "pair"]
    assert schema.field("pair").type == pa.string()  # an int64 in Parquet, text in JSONL and CSV
    only_parquet = extra_schema(files[1:2])
    assert only_parquet.field("pair").type == pa.int64()
    rows = read_range(files[1], 0, 3)
    table = extras_table(rows, schema)
    assert table.column("pair").to_pylist() == ["60", "61", "62"]


def test_malformed_rows_name_their_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a b"}\nnot json\n[1, 2]\n{"text": null}\n{"target": " x"}\n{"prompt": 5}\n')
    data = scan(path, 64)
    got = [(r.where.rsplit("/", 1)[1], r.error) for r in read_range(data, 0, data.rows)]
    assert got[0] == ("bad.jsonl:1", None)
    assert got[1][0] == "bad.jsonl:2" and got[1][1].startswith("not valid JSON")
    assert got[2] == ("bad.jsonl:3", "a JSON list, not an object")
    assert got[3] == ("bad.jsonl:4", "its text is empty")
    assert got[4] == ("bad.jsonl:5", "no 'prompt' value")
    assert got[5] == ("bad.jsonl:6", "its prompt is a int, not text")


def test_a_csv_row_with_the_wrong_number_of_fields(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('prompt,target\n"a, b",x\n"multi\nline",y\nc,d,e\n')
    data = scan(path, 2)
    got = read_range(data, 0, data.rows)
    assert [r.fields.get("prompt") for r in got[:2]] == ["a, b", "multi\nline"]
    assert got[2].where.endswith("bad.csv:5") and got[2].error == "3 fields where the header has 2"
    assert [r.index for r in read_range(data, 1, 3)] == [1, 2]


def test_parquet_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "c"]}), path)
    got = read_range(scan(path, 64), 0, 3)
    assert got[1].where.endswith("p.parquet row 2") and got[1].error == "its prompt is empty"


def test_missing_prompt_column_is_an_error_naming_the_file(tmp_path):
    pq.write_table(pa.table({"question": ["a"]}), tmp_path / "q.parquet")
    with pytest.raises(TdbqlError, match=r"q.parquet' has no 'prompt' \(or 'text'\) column \(columns: question\)"):
        scan(tmp_path / "q.parquet", 64)
    (tmp_path / "q.csv").write_text("question\na\n")
    with pytest.raises(TdbqlError, match="has no 'prompt'"):
        scan(tmp_path / "q.csv", 64)
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(TdbqlError, match="has no 'prompt'"):
        scan(tmp_path / "q.jsonl", 64)


def test_no_files_or_a_wrong_suffix_are_errors(tmp_path):
    with pytest.raises(TdbqlError, match="no prompt files match"):
        find_files(str(tmp_path / "*.parquet"))
    with pytest.raises(TdbqlError, match="holds no prompt files"):
        find_files(str(tmp_path))
    with pytest.raises(TdbqlError, match="no such prompts file or folder"):
        find_files(str(tmp_path / "missing"))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(TdbqlError, match="expected one of"):
        find_files(str(tmp_path / "x.xlsx"))


def test_prompts_from_a_glob_streams_the_dataset_a_chunk_at_a_time(dataset, rows, monkeypatch):
    """`prompts from 'data/*'` in a session: the dataset's rows in order, read a few rows at a
    time (a text file from its marks, Parquet by record batches), never a whole file at once."""
    import pyarrow.parquet as parquet
    from tdbql.shell.run import dataset as module
    from tdbql.shell.session import Session

    monkeypatch.setattr(module, "STREAM_ROWS", 7)
    reads, batches = [], []
    read_range_of = module.read_range
    monkeypatch.setattr(module, "read_range", lambda data, start, stop: reads.append(stop - start)
                        or read_range_of(data, start, stop))
    iter_batches = parquet.ParquetFile.iter_batches
    monkeypatch.setattr(parquet.ParquetFile, "iter_batches", lambda self, size, **kw: (
        batches.append(b.num_rows) or b for b in iter_batches(self, size, **kw)))
    monkeypatch.setattr(parquet, "read_table", None)  # a whole-file read would fail
    session = Session()
    try:
        session.execute(f"prompts from '{dataset}/*'")
        got = session.con.sql("SELECT prompt_id, text, target, distractor, corrupt FROM prompts "
                              "ORDER BY prompt_id").fetchall()
    finally:
        session.close()
    assert got == [(i, r["prompt"], r["target"], r["distractor"], r["corrupt"]) for i, r in enumerate(rows)]
    assert max(reads) == 7 and sum(reads) == 60 + 30  # a.jsonl and c.csv, in chunks
    assert max(batches) == 7 and sum(batches) == 70  # b.parquet, in record batches


def test_a_malformed_row_in_a_streamed_dataset_names_its_file_and_line(tmp_path):
    from tdbql.shell.session import Session

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"prompt": "When Mary"}\n{"prompt": 3}\n')
    session = Session()
    try:
        with pytest.raises(TdbqlError, match=r"a.jsonl:2: malformed row: its prompt is a int, not text"):
            session.execute(f"prompts from '{tmp_path / 'data'}'")
    finally:
        session.close()


@pytest.mark.parametrize("name", ["a" * 5000, "a\x00b"])
def test_a_name_too_long_or_holding_nul_is_simply_not_there(name):
    from tdbql.shell.run.dataset import is_dataset

    assert not is_dataset(name)
    with pytest.raises(TdbqlError, match="no such prompts file or folder"):
        find_files(name)


def test_a_shard_of_a_large_row_group_reads_record_batches_up_to_its_last_row(tmp_path, monkeypatch):
    import pyarrow.parquet as parquet
    from tdbql.shell.run import dataset as module

    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(5000)]}), path, row_group_size=5000)
    monkeypatch.setattr(module, "STREAM_ROWS", 100)
    decoded = []
    iter_batches = parquet.ParquetFile.iter_batches
    monkeypatch.setattr(parquet.ParquetFile, "iter_batches", lambda self, size, **kw: (
        decoded.append(b.num_rows) or b for b in iter_batches(self, size, **kw)))
    got = read_range(scan(path, 64), 250, 260)
    assert [(r.index, r.fields["prompt"]) for r in got] == [(i, f"p{i}") for i in range(250, 260)]
    assert decoded == [100, 100, 100]  # rows 0..299 of the group's 5,000
