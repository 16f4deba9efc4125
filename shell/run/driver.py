"""A run, from the command's options to the summary line.

    prepare: the run file read and checked, the dataset scanned, the shards planned
    run_dataset: lock the folder, start or resume its manifest, run the shards it lacks on an
                 engine (recording each as it commits), merge what merges, say what happened
"""

from __future__ import annotations

import platform
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ...query.errors import TdbqlError
from ...query.plan import BoundQuery
from ..text import substitute_params
from .dataset import DataFile, find_files, scan
from .merge import finish_over, merge_over_states, merge_topk, reduce_metric, reduce_patching
from .queries import RunFile, read_run_file
from .shards import (
    FolderLock,
    Manifest,
    Shard,
    clear_attempts,
    clear_tmp,
    count_attempts,
    merged_file,
    plan_shards,
)
from .worker import FAULT_ENV, RunConfig

ENGINES = ("local", "ray")
ON_ERROR = ("stop", "skip")
DEFAULT_SHARD_ROWS = 512


@dataclass
class RunOptions:
    query_file: str
    prompts: str
    out: str
    engine: str = "local"
    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    shard_rows: int = DEFAULT_SHARD_ROWS
    batch_size: int | None = None
    model: str = "default"
    device: str | None = None  # None: cuda when workers have GPUs, else cpu
    dtype: str = "fp32"
    on_error: str = "stop"
    params: dict[str, str] = field(default_factory=dict)
    progress: Callable[[int, int], None] | None = None  # (prompts done, prompts in all) per shard committed

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if self.gpus_per_worker else "cpu")


@dataclass(frozen=True)
class Prepared:
    text: str
    run_file: RunFile
    files: list[DataFile]
    shards: list[Shard]
    header: dict


@dataclass
class RunSummary:
    out: str
    engine: str
    workers: int
    shards: int
    computed: int
    committed_before: int
    prompts: int  # prompts run by this invocation
    tokens: int
    seconds: float
    retried: int
    skipped_rows: list[dict]
    tables: dict[str, int]  # rows per result table

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        skipped = len(self.skipped_rows)
        first = f" (first: {self.skipped_rows[0]['where']}: {self.skipped_rows[0]['error']})" if skipped else ""
        tables = ", ".join(f"{name} {rows:,} rows" for name, rows in self.tables.items())
        return (f"run: {self.prompts:,} prompts in {self.computed} of {self.shards} shards "
                f"({self.committed_before} committed before) on {self.engine} x{self.workers}; "
                f"{self.tokens:,} tokens in {self.seconds:.1f} s ({rate:,.0f} tokens/s); "
                f"{self.retried} failure{'s' if self.retried != 1 else ''} retried; {skipped} malformed rows "
                f"skipped{first}; {self.out}: {tables}")


def versions() -> dict[str, str]:
    def of(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"tdbql": of("tdbql"), "torch": torch.__version__, "pyarrow": pa.__version__, "ray": of("ray"),
            "python": platform.python_version()}


def prepare(options: RunOptions) -> Prepared:
    _check_options(options)
    path = Path(options.query_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TdbqlError(f"cannot read the run file '{path}': {exc}") from exc
    text = substitute_params(text, options.params)
    files: list[DataFile] = []
    for found in find_files(options.prompts):
        files.append(scan(found, options.shard_rows, sum(f.rows for f in files)))
    if not sum(f.rows for f in files):
        raise TdbqlError(f"the dataset '{options.prompts}' has no rows")
    has_corrupt = any("corrupt" in f.columns for f in files)
    run_file = read_run_file(text, str(path), has_corrupt=has_corrupt)
    header = {"query": text, "query_file": str(path.resolve()), "prompts": options.prompts,
              "files": [f.signature() for f in files], "shard_rows": options.shard_rows,
              "batch_size": options.batch_size, "model": options.model, "device": options.resolved_device,
              "dtype": options.dtype, "versions": versions()}
    return Prepared(text, run_file, files, plan_shards(files, options.shard_rows), header)


def _check_options(options: RunOptions) -> None:
    if options.engine not in ENGINES:
        raise TdbqlError(f"--engine {options.engine!r}: expected {' or '.join(ENGINES)}")
    if options.on_error not in ON_ERROR:
        raise TdbqlError(f"--on-error {options.on_error!r}: expected {' or '.join(ON_ERROR)}")
    if options.address and options.engine != "ray":
        raise TdbqlError("--address names a Ray cluster: give it with --engine ray")
    if options.shard_rows < 1:
        raise TdbqlError("--shard-rows must be at least 1")


def config_for(options: RunOptions, prep: Prepared, run_id: str, fault: str | None = None) -> RunConfig:
    return RunConfig(out=str(Path(options.out).resolve()), query_text=prep.text,
                     query_file=str(Path(options.query_file).resolve()), files=[f.to_dict() for f in prep.files],
                     has_corrupt=any("corrupt" in f.columns for f in prep.files), model=options.model,
                     device=options.resolved_device, dtype=options.dtype, batch_size=options.batch_size,
                     on_error=options.on_error, run_id=run_id, fault=fault)


def run_dataset(options: RunOptions, *, fault: str | None = None) -> RunSummary:
    """Run (or resume) the run `options` describe. `fault` (tests; also $TDBQL_RUN_FAULT) makes
    a worker die once during one shard's commit."""
    import os

    prep = prepare(options)
    out = Path(options.out)
    lock = FolderLock(out)
    try:
        manifest = Manifest.start(out, prep.header)
        clear_tmp(out)
        before = set(manifest.shards)
        pending = [s for s in prep.shards if s.id not in before]
        run_id = uuid.uuid4().hex[:12]
        config = config_for(options, prep, run_id, fault or os.environ.get(FAULT_ENV))
        total = sum(s.rows for s in prep.shards)
        done = [sum(s.rows for s in prep.shards if s.id in before)]
        receipts: list[dict] = []

        def on_receipt(receipt: dict) -> None:
            manifest.record(receipt)
            receipts.append(receipt)
            done[0] += receipt["rows_read"]
            if options.progress is not None:
                options.progress(done[0], total)

        started = time.perf_counter()
        workers = 1
        try:
            if pending and options.engine == "ray":
                from .ray_engine import run_ray

                workers = run_ray(config, pending, on_receipt, address=options.address, workers=options.workers,
                                  cpus_per_worker=options.cpus_per_worker, gpus_per_worker=options.gpus_per_worker)
            elif pending:
                from .local import run_local

                run_local(config, pending, on_receipt)
        except TdbqlError as err:
            kept = len(manifest.shards)
            err.message += (f" ({kept} of {len(prep.shards)} shards committed in {out} are kept; the same command "
                            "resumes)" if kept else f" (no shard was committed in {out}; a changed run may use it)")
            raise
        seconds = time.perf_counter() - started
        attempts = count_attempts(out, run_id)
        clear_attempts(out, run_id)
        clear_tmp(out)
        tables = finalize(manifest, prep.run_file)
        manifest.data["runs"].append({"engine": options.engine, "workers": workers, "computed": len(receipts),
                                      "seconds": round(seconds, 3), "retried": sum(attempts.values()) - len(receipts)})
        manifest.save()
        skipped = [row for _, r in sorted(manifest.shards.items()) for row in r.get("skipped", ())]
        return RunSummary(str(out), options.engine, workers, len(prep.shards), len(receipts), len(before),
                          sum(r["prompts"] for r in receipts), sum(r["tokens"] for r in receipts), seconds,
                          max(0, sum(attempts.values()) - len(receipts)), skipped, tables)
    finally:
        lock.release()


# --- merging ---------------------------------------------------------------------------------------------


def finalize(manifest: Manifest, run_file: RunFile) -> dict[str, int]:
    """Every table's files once all shards are committed: merged tables computed from their
    partials (again on every run: it is cheap and the partials are kept). Returns rows per table."""
    out = manifest.out
    rows: dict[str, int] = {}
    for name, info in manifest.tables.items():
        info.pop("files", None)
        parts = manifest.files_of(name)
        if info.get("merge") in (None, "rows"):
            info["files"] = parts
            rows[name] = sum(r["tables"][name]["rows"] for r in manifest.shards.values() if name in r["tables"])
        else:
            table = merge_table(out, info, parts)
            final = merged_file(name)
            (out / final).parent.mkdir(parents=True, exist_ok=True)
            tmp = out / f"{final}.tmp"
            pq.write_table(table, tmp)
            tmp.replace(out / final)
            info["files"], info["partials"] = [final], parts
            rows[name] = table.num_rows
        info["rows"] = rows[name]
    manifest.data["complete"] = True
    manifest.save()
    queried = [t for q in run_file.queries for t in q.tables]
    return {name: rows[name] for name in queried if name in rows}


def merge_table(out: Path, info: dict, parts: list[str]) -> pa.Table:
    bound = BoundQuery.model_validate(info["plan"])
    query = bound.query
    if info["merge"] == "over_nodes":
        states = [torch.load(out / p, weights_only=True) for p in parts]
        return finish_over(merge_over_states(states), query)
    tables = [pq.read_table(out / p) for p in parts]
    if info["merge"] == "topk":
        names = tables[0].column_names
        rank_by = names[names.index("rank") + 1]  # node tables: the id columns, then the scalars, first ranking
        return merge_topk(tables, k=query.k, rank_by=rank_by, bottom=query.mode == "bottomk", by=query.by)
    if query.kind == "metric":
        return reduce_metric(tables, query.over_prompts)
    return reduce_patching(tables, query)


def print_summary(summary: RunSummary) -> None:
    print(summary.line(), file=sys.stderr, flush=True)
