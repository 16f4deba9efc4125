"""Shards, the output folder's layout, atomic commits and the manifest.

A shard is a range of the dataset's rows (the files one after another, so a shard may span
two). A prompt's id is its row number in the dataset, so results are the same however many
shards or workers a run has; a shard is the unit that is committed, skipped on a re-run, or
retried.

Layout of an output folder:

    manifest.json                          the run: query, model, versions, files, shards committed
    prompts/shard-00000.parquet            the prompt set (and tokens/, corrupt_tokens/), per shard
    q1/shard-00000.parquet                 a result combined by concatenation: one file per shard
    top/merged.parquet                     a result merged across shards (global top-k, over prompts)
    _partials/top/shard-00000.parquet      what a merged result is merged from (.pt: accumulators)

A shard's files are written under `_tmp/` and renamed into place (a rename is atomic), then the
driver records the shard in the manifest, itself replaced atomically. A shard is committed when
the manifest lists it: files of a shard it does not list (a worker killed between two renames,
a driver killed before recording) are rewritten when the shard runs again, and never read.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ...query.errors import TdbqlError
from .dataset import DataFile

MANIFEST = "manifest.json"
FORMAT = "tdbql-run/1"
# what must be equal for a re-run to resume a folder (anything else may change between runs)
RESUME_KEYS = ("query", "files", "shard_rows", "batch_size", "model", "device", "dtype")


@dataclass(frozen=True)
class Shard:
    """Rows start..stop-1 of the dataset (prompt ids), which may span files."""

    id: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)


def plan_shards(files: list[DataFile], shard_rows: int) -> list[Shard]:
    """The dataset cut into ranges of `shard_rows` rows (the last may be shorter). Shards start
    at multiples of `shard_rows`, so with a batch size that divides it, every batch holds the
    prompts one process would batch together, and results are the same to the bit."""
    total = sum(f.rows for f in files)
    return [Shard(i, start, min(start + shard_rows, total)) for i, start in enumerate(range(0, total, shard_rows))]


def pieces(shard: Shard, files: list[DataFile]) -> list[tuple[int, int, int, int]]:
    """(file index, first row, one past the last row, prompt id of the first row) per file the
    shard reads, in order."""
    out, offset = [], 0
    for index, data in enumerate(files):
        lo, hi = max(shard.start, offset), min(shard.stop, offset + data.rows)
        if lo < hi:
            out.append((index, lo - offset, hi - offset, lo))
        offset += data.rows
    return out


# --- paths -------------------------------------------------------------------------------------------


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def table_file(table: str, shard_id: int) -> str:
    return f"{table}/{shard_name(shard_id)}.parquet"


def partial_file(table: str, shard_id: int, ext: str = "parquet") -> str:
    return f"_partials/{table}/{shard_name(shard_id)}.{ext}"


def merged_file(table: str) -> str:
    return f"{table}/merged.parquet"


# --- atomic writes -----------------------------------------------------------------------------------


class Staged:
    """Files written under `out/_tmp/` first, then renamed into place together by `commit`."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.moves: list[tuple[Path, Path]] = []
        (self.out / "_tmp").mkdir(parents=True, exist_ok=True)

    def path_for(self, rel: str) -> Path:
        """A temporary path for the file that `commit` moves to `out/rel`."""
        tmp = self.out / "_tmp" / f"{uuid.uuid4().hex}{Path(rel).suffix}"
        self.moves.append((tmp, self.out / rel))
        return tmp

    def parquet(self, rel: str, table: pa.Table) -> None:
        pq.write_table(table, self.path_for(rel))

    def commit(self, between: Callable[[int], None] | None = None) -> list[str]:
        """Rename every staged file into place; `between(i)` runs after the i-th rename (the
        fault-injection hook of the tests). Returns the relative paths."""
        done = []
        for i, (tmp, final) in enumerate(self.moves):
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            done.append(str(final.relative_to(self.out)))
            if between is not None:
                between(i)
        self.moves = []
        return done


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- the manifest ------------------------------------------------------------------------------------


class Manifest:
    """manifest.json: the run's header (what it computes), its tables, and the shards committed
    (each with its receipt: rows per table, prompts, tokens, skipped rows, seconds)."""

    def __init__(self, out: Path, data: dict) -> None:
        self.out = Path(out)
        self.data = data

    @classmethod
    def load(cls, out: Path) -> Manifest | None:
        path = Path(out) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TdbqlError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TdbqlError(f"{path} is not a tdbql run manifest (format {FORMAT})")
        return cls(out, data)

    @classmethod
    def start(cls, out: Path, header: dict) -> Manifest:
        """The folder's manifest for a run with `header`: the existing one when it is the same
        run (to resume), a new one when there is none; an error when it is another run's."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise TdbqlError(f"--out {out} is a file, not a folder")
        old = cls.load(out)
        if old is None:
            if out.exists() and any(p.name not in ("_tmp", "_attempts", ".lock") for p in out.iterdir()):
                raise TdbqlError(f"--out {out} holds files but no {MANIFEST}: give an empty or new folder")
            return cls._new(out, header)
        changed = [key for key in RESUME_KEYS if old.data.get(key) != header.get(key)]
        if changed and not old.shards:  # nothing of the other run to keep: this run takes the folder
            return cls._new(out, header)
        if changed:
            raise TdbqlError(f"{out} holds a run of another {' and '.join(_describe(k) for k in changed)}; "
                             "give another --out folder, or delete this one to start again")
        old.data.update({k: v for k, v in header.items() if k not in RESUME_KEYS})
        return old

    @classmethod
    def _new(cls, out: Path, header: dict) -> Manifest:
        out.mkdir(parents=True, exist_ok=True)
        manifest = cls(out, {"format": FORMAT, **header, "tables": {}, "shards": {}, "runs": [], "complete": False})
        manifest.save()
        return manifest

    @property
    def shards(self) -> dict[int, dict]:
        return {int(k): v for k, v in self.data["shards"].items()}

    @property
    def tables(self) -> dict[str, dict]:
        return self.data["tables"]

    def record(self, receipt: dict) -> None:
        """Commit a shard (its files are in place): it is listed, and the manifest saved."""
        tables = {}
        for name, info in receipt.get("tables", {}).items():
            self.tables.setdefault(name, {k: info[k] for k in ("query", "merge", "plan") if k in info})
            tables[name] = {"file": info["file"], "rows": info["rows"]}
        self.data["shards"][str(receipt["shard"])] = {**receipt, "tables": tables}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.out / MANIFEST, self.data)

    def files_of(self, table: str) -> list[str]:
        """The files that make `table`: its merged file, or its shard files in shard order."""
        info = self.tables.get(table, {})
        if "files" in info:
            return list(info["files"])
        return [r["tables"][table]["file"] for _, r in sorted(self.shards.items()) if table in r.get("tables", {})]


def _describe(key: str) -> str:
    return {"query": "query file", "files": "dataset (files, sizes or times differ)", "shard_rows": "shard size",
            "batch_size": "batch size", "model": "model", "device": "device", "dtype": "dtype"}[key]


class FolderLock:
    """One run writes a folder at a time (an advisory lock, released when the process ends)."""

    def __init__(self, out: Path) -> None:
        Path(out).mkdir(parents=True, exist_ok=True)
        self.handle = open(Path(out) / ".lock", "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.handle.close()
            raise TdbqlError(f"another run is writing {out}") from exc

    def release(self) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


# --- attempts: how many times each shard started (retries) -------------------------------------------


def clear_tmp(out: Path) -> None:
    """Staged files a dead worker left behind (only while this run holds the folder's lock)."""
    folder = Path(out) / "_tmp"
    if folder.exists():
        for path in folder.iterdir():
            path.unlink()


def mark_attempt(out: Path, run_id: str, shard_id: int) -> None:
    folder = Path(out) / "_attempts" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{shard_name(shard_id)}.{uuid.uuid4().hex}").touch()


def count_attempts(out: Path, run_id: str) -> dict[int, int]:
    folder = Path(out) / "_attempts" / run_id
    counts: dict[int, int] = {}
    if folder.exists():
        for path in folder.iterdir():
            if path.name.startswith("shard-"):
                shard = int(path.name.split(".")[0].removeprefix("shard-"))
                counts[shard] = counts.get(shard, 0) + 1
    return counts


def clear_attempts(out: Path, run_id: str) -> None:
    folder = Path(out) / "_attempts" / run_id
    if folder.exists():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
