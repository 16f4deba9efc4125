"""Every ```tql example in docs/language.md runs on the embedded model, in order, in one session.

The examples share one session the way a reader would type them. Before the first block the session
gets two IOI prompt pairs of equal length (so every position and every patch in the examples
exists), and the files the examples name (`ioi.jsonl`, `saes/mlp`, `./checkpoints/my model`) are
written into the working folder. After each block the model, the pairs and compile are set again, so
a block that sets its own prompts or settings does not change what the next one sees. The only statements not run are the ones
that need a machine this test does not have (CUDA, the network); for those the test checks the
error says so.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tdbql.query.errors import TdbqlError
from tdbql.shell.session import Session

from tests.shell.test_session import write_saelens_sae

DOC = Path(__file__).resolve().parents[2] / "docs" / "language.md"
EXAMPLES = re.findall(r"```tql\n(.*?)```", DOC.read_text(), flags=re.DOTALL)

PAIRS = [
    ("When Mary and John went to the store, John gave a drink to",
     "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ("When Bob and Alice went to the office, Alice gave a book to",
     "When Bob and Alice went to the office, Bob gave a book to", " Bob", " Alice"),
]
SET_PAIRS = "prompts from (select prompt, corrupt, target, distractor from pairs)"
# Between blocks: the embedded model, the pairs, and no compile (the set example turns it on; compiling
# every later query on the CPU would only cost time).
RESET = f"model default\nset compile = off\n{SET_PAIRS}"

# Statements that need what a CPU-only test machine without a network lacks, with the error each gives.
NEEDS_CUDA = "CUDA is not available"
NOT_HERE = {
    "model EleutherAI/pythia-70m dtype=bf16 device=cuda:0": NEEDS_CUDA,
    "set device to 'cuda:0'": NEEDS_CUDA,
}


@pytest.fixture
def docs_session(tmp_path, monkeypatch):
    from tdbql.executor.runtime.loading import DEFAULT_MODEL_DIR

    monkeypatch.chdir(tmp_path)
    write_files(tmp_path, DEFAULT_MODEL_DIR)
    session = Session(model="default")
    rows = ",\n".join("(" + ", ".join(sql_string(v) for v in pair) + ")" for pair in PAIRS)
    session.execute(f"create table pairs as select * from (values {rows}) t(prompt, corrupt, target, distractor);\n"
                    + SET_PAIRS)
    yield session
    session.close()


def write_files(folder: Path, model_dir: Path) -> None:
    with (folder / "ioi.jsonl").open("w") as f:
        for prompt, corrupt, target, distractor in PAIRS:
            f.write(json.dumps({"prompt": prompt, "corrupt": corrupt, "target": target,
                                "distractor": distractor}) + "\n")
    config = json.loads((model_dir / "config.json").read_text())
    for layer in range(config["n_layer"]):
        write_saelens_sae(folder / "saes" / "mlp" / f"mlp_L{layer}", layer=layer, d_in=config["n_inner"],
                          d_sae=32, seed=layer)
    shutil.copytree(model_dir, folder / "checkpoints" / "my model")


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def test_every_example_runs(docs_session):
    ran = 0
    for example in EXAMPLES:
        runnable = [line for line in example.splitlines() if line.strip() not in NOT_HERE]
        for line in example.splitlines():
            if line.strip() in NOT_HERE:
                with pytest.raises(TdbqlError, match=NOT_HERE[line.strip()]):
                    docs_session.execute(line)
        if any(line.strip() for line in runnable):
            results = docs_session.execute("\n".join(runnable))
            assert results, f"no statement ran in:\n{example}"
            ran += len(results)
        docs_session.execute(RESET)
    assert ran >= 60


def test_every_unrunnable_statement_is_in_the_docs():
    lines = {line.strip() for example in EXAMPLES for line in example.splitlines()}
    assert set(NOT_HERE) <= lines
