"""Prompt datasets: a folder, a glob or a file of Parquet, JSONL or CSV prompts.

The columns are a prompts file's (`prompt`, or `text`; optional `target`, `distractor`,
`corrupt`); any other column is kept beside the prompt for joins. Files are taken in sorted
order and their rows numbered in order, so a row's place in the dataset (its prompt id) does
not depend on how the run is cut into shards.

`scan` reads each file once, without keeping it: the row count, the columns, and, for the text
formats, where every `stride`-th row starts (byte offset and line), so a shard is read from its
own first row (`read_range`) and nothing loads the whole dataset. A row that cannot be a prompt
(not JSON, not an object, a CSV row with the wrong number of fields, no prompt text) comes back
as a `RawRow` with an error and its place: `data/a.jsonl:17` (line 17) or `data/a.parquet row 17`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from ...query.context import PromptRow
from ...query.errors import TdbqlError
from ..prompts import OPTIONAL_COLUMNS, TEXT_COLUMNS, optional_text, text_column

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
STREAM_ROWS = 4096  # rows read at a time by `stream_prompts`
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Mark:
    """Where row `row` (0-based, data rows only) of a text file starts."""

    row: int
    byte: int
    line: int  # 1-based line of the file


@dataclass(frozen=True)
class DataFile:
    path: str  # absolute
    format: str  # parquet | jsonl | csv | tsv
    rows: int
    columns: tuple[str, ...]  # the header (csv, parquet) or the first row's keys (jsonl)
    size: int
    mtime_ns: int
    marks: tuple[Mark, ...] = ()  # text formats: every stride-th row

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataFile:
        data = dict(data)
        data["columns"] = tuple(data["columns"])
        data["marks"] = tuple(Mark(**m) for m in data.get("marks", ()))
        return cls(**data)

    def signature(self) -> dict:
        """What must not change for a run to resume over this file."""
        return {"path": self.path, "rows": self.rows, "size": self.size, "mtime_ns": self.mtime_ns}

    def mark_for(self, row: int) -> Mark:
        """The last mark at or before `row`."""
        best = Mark(0, 0, 1)
        for mark in self.marks:
            if mark.row <= row:
                best = mark
        return best


@dataclass
class RawRow:
    """One dataset row: its prompt fields and extra columns, or why it is not a prompt."""

    index: int  # 0-based row of its file
    where: str  # `path:line` or `path row N`, for messages
    fields: dict[str, str | None] = field(default_factory=dict)  # prompt, target, distractor, corrupt
    extras: dict = field(default_factory=dict)
    error: str | None = None

    def prompt(self, prompt_id: int) -> PromptRow:
        """The row as a prompt (a row without an error)."""
        f = self.fields
        return PromptRow(prompt_id=prompt_id, text=f["prompt"], target=f["target"], distractor=f["distractor"],
                         corrupt=f["corrupt"])


# --- finding and scanning files ------------------------------------------------------------------


def find_files(spec: str) -> list[Path]:
    """The dataset's files, sorted: a glob, a folder (its files with a known suffix) or one file."""
    path = Path(spec).expanduser()
    suffixes = ", ".join(sorted(FORMATS))
    if _GLOB_CHARS & set(spec):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        found = [p for p in found if p.suffix.lower() in FORMATS]
        if not found:
            raise TdbqlError(f"no prompt files match '{spec}' (suffixes {suffixes})")
        return [p.resolve() for p in found]
    if os.path.isdir(path):  # os.path: a name too long or holding NUL is simply not there
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not found:
            raise TdbqlError(f"the folder '{spec}' holds no prompt files (suffixes {suffixes})")
        return [p.resolve() for p in found]
    if not os.path.exists(path):
        raise TdbqlError(f"no such prompts file or folder: '{spec}'")
    if path.suffix.lower() not in FORMATS:
        raise TdbqlError(f"cannot read prompts from '{path.name}': expected one of {suffixes}")
    return [path.resolve()]


def scan(path: Path, stride: int, offset: int = 0) -> DataFile:
    """Count the rows of one file and find its columns (and, for text, where each row that
    starts a shard begins: rows whose prompt id, `offset` + row, is a multiple of `stride`)."""
    fmt = FORMATS[path.suffix.lower()]
    stat = path.stat()
    try:
        if fmt == "parquet":
            rows, columns, marks = _scan_parquet(path)
        elif fmt == "jsonl":
            rows, columns, marks = _scan_jsonl(path, stride, offset)
        else:
            rows, columns, marks = _scan_csv(path, stride, offset, fmt)
    except (OSError, pa.ArrowException, UnicodeDecodeError, csv.Error) as exc:
        raise TdbqlError(f"cannot read prompts from '{path}': {exc}") from exc
    data = DataFile(str(path), fmt, rows, tuple(columns), stat.st_size, stat.st_mtime_ns, tuple(marks))
    check_columns(data)
    return data


def check_columns(data: DataFile) -> None:
    """A file without a prompt column is an error before anything runs (a JSONL file's columns
    are its first row's keys; a later row without one is a malformed row)."""
    if data.rows == 0 or data.format == "jsonl" and not data.columns:
        return
    if not any(c in data.columns for c in TEXT_COLUMNS):
        have = ", ".join(data.columns) or "none"
        raise TdbqlError(f"'{data.path}' has no 'prompt' (or 'text') column (columns: {have})")


def _scan_parquet(path: Path) -> tuple[int, list[str], list[Mark]]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path)
    schema = meta.schema_arrow
    text = text_column(schema.names)
    if text is not None and not (pa.types.is_string(schema.field(text).type)
                                 or pa.types.is_large_string(schema.field(text).type)):
        raise TdbqlError(f"'{path}': column {text} is {schema.field(text).type}, not text")
    return meta.metadata.num_rows, list(schema.names), []


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line, byte offset of its start, the line's bytes) for every line."""
    with path.open("rb") as f:
        offset = 0
        for number, line in enumerate(f, start=1):
            yield number, offset, line
            offset += len(line)


def _scan_jsonl(path: Path, stride: int, offset: int) -> tuple[int, list[str], list[Mark]]:
    rows, columns, marks = 0, [], []
    for number, byte, line in _lines(path):
        if not line.strip():
            continue
        if (offset + rows) % stride == 0:
            marks.append(Mark(rows, byte, number))
        if rows == 0:
            try:
                first = json.loads(line)
                columns = list(first) if isinstance(first, dict) else []
            except ValueError:
                columns = []
        rows += 1
    return rows, columns, marks


class _TrackedLines:
    """Lines of a text file for `csv.reader`, remembering how many bytes (and lines) it took."""

    def __init__(self, f, start_line: int) -> None:
        self.f, self.consumed, self.line = f, 0, start_line - 1

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            raise StopIteration
        self.consumed += len(raw)
        self.line += 1
        return raw.decode("utf-8-sig" if self.line == 1 else "utf-8")


def _records(path: Path, fmt: str, byte: int = 0, line: int = 1) -> Iterator[tuple[int, int, list[str]]]:
    """(line where the record starts, byte offset of its start, fields), from `byte` on."""
    with path.open("rb") as f:
        f.seek(byte)
        lines = _TrackedLines(f, line)
        reader = csv.reader(lines, delimiter="\t" if fmt == "tsv" else ",")
        start_byte, start_line = byte, line
        for record in reader:
            yield start_line, start_byte, record
            start_byte, start_line = byte + lines.consumed, lines.line + 1


def _scan_csv(path: Path, stride: int, offset: int, fmt: str) -> tuple[int, list[str], list[Mark]]:
    rows, columns, marks = -1, [], []
    for line, byte, record in _records(path, fmt):
        if rows == -1:
            columns = record
        elif record:
            if (offset + rows) % stride == 0:
                marks.append(Mark(rows, byte, line))
        else:
            continue  # a blank line is no row
        rows += 1
    return max(rows, 0), columns, marks


def is_dataset(spec: str | Path) -> bool:
    """Whether `spec` names several files (a glob or a folder) rather than one prompt file."""
    return bool(_GLOB_CHARS & set(str(spec))) or os.path.isdir(Path(spec).expanduser())


def stream_prompts(spec: str) -> list[PromptRow]:
    """The prompts of a glob or a folder (`prompts from 'data/*.parquet'` in a session), read
    file by file and `STREAM_ROWS` rows at a time: only the prompt fields of each chunk are kept,
    never a whole file's table. The first malformed row is an error naming its file and row."""
    out: list[PromptRow] = []
    for path in find_files(spec):
        for raw in _stream_file(scan(path, STREAM_ROWS)):
            if raw.error is not None:
                raise TdbqlError(f"{raw.where}: malformed row: {raw.error}")
            out.append(raw.prompt(len(out)))
    if not out:
        raise TdbqlError(f"the dataset '{spec}' has no rows")
    return out


def _stream_file(data: DataFile) -> Iterator[RawRow]:
    if data.format != "parquet":  # the text formats: each chunk read from its mark on
        for start in range(0, data.rows, STREAM_ROWS):
            yield from read_range(data, start, min(start + STREAM_ROWS, data.rows))
        return
    import pyarrow.parquet as pq

    path, start = Path(data.path), 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(STREAM_ROWS):
            yield from _parquet_rows(path, pa.Table.from_batches([batch]), start)
            start += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise TdbqlError(f"cannot read prompts from '{path}': {exc}") from exc


# --- reading a range of rows ---------------------------------------------------------------------


def read_range(data: DataFile, start: int, stop: int) -> list[RawRow]:
    """Rows start..stop-1 of one file (0-based data rows), each a prompt or an error."""
    path = Path(data.path)
    try:
        if data.format == "parquet":
            return _read_parquet(path, start, stop)
        if data.format == "jsonl":
            return _read_jsonl(data, start, stop)
        return _read_csv(data, start, stop)
    except (OSError, pa.ArrowException, UnicodeDecodeError, csv.Error) as exc:
        raise TdbqlError(f"cannot read prompts from '{path}': {exc}") from exc


def _read_parquet(path: Path, start: int, stop: int) -> list[RawRow]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    groups, first, seen = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if seen + n > start and seen < stop:
            groups.append(g)
            first = seen if first is None else first
        seen += n
    out, at = [], first
    for batch in pf.iter_batches(STREAM_ROWS, row_groups=groups) if groups else ():  # never a whole row group
        lo, hi = max(start, at), min(stop, at + batch.num_rows)
        if lo < hi:
            out += _parquet_rows(path, pa.Table.from_batches([batch]).slice(lo - at, hi - lo), lo)
        at += batch.num_rows
        if at >= stop:
            break
    return out


def _parquet_rows(path: Path, table: pa.Table, start: int) -> list[RawRow]:
    """The rows of `table`, rows start.. of the file at `path`."""
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return [_row(start + i, f"{path} row {start + i + 1}", {k: v[i] for k, v in columns.items()}, typed=True)
            for i in range(table.num_rows)]


def _read_jsonl(data: DataFile, start: int, stop: int) -> list[RawRow]:
    path = Path(data.path)
    mark = data.mark_for(start)
    out, row = [], mark.row
    with path.open("rb") as f:
        f.seek(mark.byte)
        for number, line in enumerate(f, start=mark.line):
            if not line.strip():
                continue
            if row >= stop:
                break
            if row >= start:
                out.append(_json_row(row, f"{path}:{number}", line))
            row += 1
    return out


def _json_row(index: int, where: str, line: bytes) -> RawRow:
    try:
        value = json.loads(line)
    except ValueError as exc:
        return RawRow(index, where, error=f"not valid JSON ({exc})")
    if not isinstance(value, dict):
        return RawRow(index, where, error=f"a JSON {type(value).__name__}, not an object")
    return _row(index, where, value, typed=False)


def _read_csv(data: DataFile, start: int, stop: int) -> list[RawRow]:
    path = Path(data.path)
    header = list(data.columns)
    mark = data.mark_for(start)
    out, row = [], mark.row
    if mark.byte == 0:  # no mark: from the header on
        records = _records(path, data.format)
        next(records, None)
    else:
        records = _records(path, data.format, mark.byte, mark.line)
    for line, _, record in records:
        if not record:
            continue
        if row >= stop:
            break
        if row >= start:
            where = f"{path}:{line}"
            if len(record) != len(header):
                out.append(RawRow(row, where, error=f"{len(record)} fields where the header has {len(header)}"))
            else:
                out.append(_row(row, where, dict(zip(header, record)), typed=False))
        row += 1
    return out


def _row(index: int, where: str, values: dict, *, typed: bool) -> RawRow:
    """A row's prompt fields and extras; `typed` (Parquet) keeps extra values as they are, else
    they are text (JSON values other than strings as their JSON)."""
    text_col = text_column(values)
    if text_col is None:
        return RawRow(index, where, error="no 'prompt' value")
    text = values[text_col]
    if not isinstance(text, str):
        what = "empty" if text is None else f"a {type(text).__name__}, not text"
        return RawRow(index, where, error=f"its {text_col} is {what}")
    fields: dict[str, str | None] = {"prompt": text}
    for name in OPTIONAL_COLUMNS:
        fields[name] = optional_text(values.get(name))
    used = {text_col, *OPTIONAL_COLUMNS}
    extras = {k: (v if typed or v is None or isinstance(v, str) else json.dumps(v))
              for k, v in values.items() if k not in used}
    return RawRow(index, where, fields, extras)


def _extra_fields(data: DataFile) -> list[pa.Field]:
    used = set(TEXT_COLUMNS[:1] if "prompt" in data.columns else TEXT_COLUMNS) | set(OPTIONAL_COLUMNS)
    if data.format == "parquet":
        import pyarrow.parquet as pq

        return [f for f in pq.ParquetFile(data.path).schema_arrow if f.name not in used]
    return [pa.field(c, pa.string()) for c in data.columns if c not in used]


def extra_schema(files: list[DataFile]) -> pa.Schema:
    """The dataset's extra columns, in the order first met: a Parquet column keeps its type
    when every file that has it agrees, anything else is text."""
    types: dict[str, pa.DataType] = {}
    for data in files:
        for f in _extra_fields(data):
            types[f.name] = f.type if types.get(f.name, f.type) == f.type else pa.string()
    return pa.schema(list(types.items()))


def extras_table(rows: list[RawRow], schema: pa.Schema) -> pa.Table:
    """The extra columns of `rows` as `schema` says (values of another type as text)."""
    columns = []
    for f in schema:
        values = [r.extras.get(f.name) for r in rows]
        if pa.types.is_string(f.type):
            values = [v if v is None or isinstance(v, str) else _as_text(v) for v in values]
        columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _as_text(value) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)
