"""Prompt sets: read jsonl/json/csv/parquet/txt files or a SQL result into `PromptRow`s.

Columns: `prompt` (or `text`), optional `target` and `distractor` (the per-prompt loss, which
overrides the session `target`) and `corrupt` (the corrupted prompt of the pair, for patching). Extra columns are ignored. A `.txt` file has one prompt per line.
A glob or a folder (`prompts from 'data/*.parquet'`) is a dataset: run/dataset.py streams it.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa

from ..query.context import PromptRow
from ..query.errors import TdbqlError
from ..query.plan import Loss

PROMPT_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt")
TEXT_COLUMNS: tuple[str, ...] = ("prompt", "text")
OPTIONAL_COLUMNS: tuple[str, ...] = ("target", "distractor", "corrupt")
PROMPT_COLUMNS: tuple[str, ...] = TEXT_COLUMNS + OPTIONAL_COLUMNS


def read_prompt_file(path: Path) -> list[PromptRow]:
    """Read a prompt file into rows; raises TdbqlError for a missing file or bad columns. A glob
    or a folder of Parquet, JSONL or CSV files is read as a run's dataset is, a chunk at a time."""
    from .run.dataset import is_dataset, stream_prompts

    if is_dataset(path):
        return stream_prompts(str(path))
    if not os.path.exists(path):  # os.path: a name too long or holding NUL is simply not there
        raise TdbqlError(f"prompt file not found: '{path}'")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise TdbqlError(f"cannot read prompts from '{path.name}': expected one of {', '.join(PROMPT_FILE_SUFFIXES)}")
    if suffix == ".txt":
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        return [PromptRow(prompt_id=i, text=t) for i, t in enumerate(t for t in lines if t.strip())]
    try:
        table = _read_arrow(path, suffix)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise TdbqlError(f"cannot read prompts from '{path}': {exc}") from exc
    return prompts_from_arrow(table, source=f"'{path.name}'")


def _read_arrow(path: Path, suffix: str) -> pa.Table:
    if suffix in (".jsonl", ".ndjson"):
        import pyarrow.json as pj

        return pj.read_json(path)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError("a .json prompt file holds a list of objects")
        return pa.Table.from_pylist(data)
    if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pc

        parse = pc.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        convert = pc.ConvertOptions(strings_can_be_null=False,
                                    column_types={c: pa.string() for c in PROMPT_COLUMNS})
        return pc.read_csv(path, parse_options=parse, convert_options=convert)
    import pyarrow.parquet as pq

    return pq.read_table(path)


def text_column(names) -> str | None:
    """The column holding the prompt text: `prompt`, else `text`."""
    return next((c for c in TEXT_COLUMNS if c in names), None)


def optional_text(value) -> str | None:
    """An optional field's value (target, distractor, corrupt): empty is absent."""
    return None if value in (None, "") else str(value)


def prompts_from_arrow(table: pa.Table, *, source: str = "the result") -> list[PromptRow]:
    """Rows from an Arrow table with a `prompt` or `text` column (and optional target, distractor,
    corrupt)."""
    text_col = text_column(table.column_names)
    if text_col is None:
        raise TdbqlError(
            f"{source} has no 'prompt' or 'text' column (columns: {', '.join(table.column_names) or 'none'})"
        )
    texts = table.column(text_col).to_pylist()
    optional = {name: _optional_column(table, name) for name in OPTIONAL_COLUMNS}
    rows = []
    for i, text in enumerate(texts):
        if text is None:
            raise TdbqlError(f"{source}: row {i + 1} has an empty {text_col}")
        rows.append(PromptRow(prompt_id=i, text=str(text), **{name: values[i] for name, values in optional.items()}))
    if not rows:
        raise TdbqlError(f"{source} has no rows")
    return rows


def _optional_column(table: pa.Table, name: str) -> list[str | None]:
    if name not in table.column_names:
        return [None] * table.num_rows
    return [optional_text(v) for v in table.column(name).to_pylist()]


def prompt_rows(texts: Sequence[str], corrupts: Sequence[str | None] = ()) -> list[PromptRow]:
    corrupts = list(corrupts) or [None] * len(texts)
    return [PromptRow(prompt_id=i, text=t, corrupt=c) for i, (t, c) in enumerate(zip(texts, corrupts))]


def resolve_path(path: str, source_name: str | None) -> Path:
    """A relative path names a file beside the query file when it exists there, else in the cwd."""
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and source_name:
        beside = Path(source_name).parent / candidate
        if os.path.exists(beside) or glob.glob(str(beside)):  # a file, a folder, or a glob that matches
            return beside
    return candidate


# --- the session's prompts and tokens tables --------------------------------------------------------

PROMPTS_SCHEMA = pa.schema([("prompt_id", pa.int64()), ("text", pa.string()), ("target", pa.string()),
                            ("distractor", pa.string()), ("n_tokens", pa.int64()), ("corrupt", pa.string()),
                            ("corrupt_n_tokens", pa.int64())])
TOKENS_SCHEMA = pa.schema([("prompt_id", pa.int64()), ("position", pa.int64()), ("token_id", pa.int64()),
                           ("token", pa.string())])


def prompts_table(prompts: list[PromptRow], encoded: list[list[int]],
                  corrupt_encoded: list[list[int] | None]) -> pa.Table:
    return pa.table(
        {
            "prompt_id": [p.prompt_id for p in prompts],
            "text": [p.text for p in prompts],
            "target": [p.target for p in prompts],
            "distractor": [p.distractor for p in prompts],
            "n_tokens": [len(ids) for ids in encoded],
            "corrupt": [p.corrupt for p in prompts],
            "corrupt_n_tokens": [None if ids is None else len(ids) for ids in corrupt_encoded],
        },
        schema=PROMPTS_SCHEMA,
    )


def tokens_table(prompts: list[PromptRow], encoded: list[list[int] | None],
                 token_str: Callable[[int], str]) -> pa.Table:
    """One row per token (prompts without `encoded` ids, e.g. no corrupted prompt, give none)."""
    rows = [(p.prompt_id, pos, tid, token_str(tid)) for p, ids in zip(prompts, encoded) if ids is not None
            for pos, tid in enumerate(ids)]
    columns = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.table({name: list(col) for name, col in zip(TOKENS_SCHEMA.names, columns)}, schema=TOKENS_SCHEMA)


def describe_loss(loss: Loss) -> str:
    targets = " + ".join(repr(t) for t in loss.targets)
    if loss.kind == "logprob":
        return f"logprob({targets}) at the last token"
    distractors = " + ".join(repr(t) for t in loss.distractors)
    return f"logit({targets}) - logit({distractors}) at the last token"
