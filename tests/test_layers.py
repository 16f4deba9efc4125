"""The tree is the pipeline: each stage imports only the stages before it, and modules stay small.

Stages, in order: query (the contract) < grammar (text -> plan) < executor (plan -> Arrow) <
shell (session, CLI, REPL). Imports are read with ast, relative ones resolved against the file's
folder, absolute ones through the `tdbql.` package names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
STAGES = ("query", "grammar", "executor", "shell")
MAX_LINES = 500
SOURCES = [p for stage in STAGES for p in sorted((ROOT / stage).rglob("*.py"))]


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "tdbql":
        parts = parts[1:]
    return parts[0] if parts and parts[0] in STAGES else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    package = list(path.relative_to(ROOT).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_back_up_the_pipeline(path):
    own = STAGES.index(path.relative_to(ROOT).parts[0])
    upward = [f"{line}: {module}" for line, module in imported_modules(path)
              if stage_of(module) and STAGES.index(stage_of(module)) > own]
    assert not upward


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_500_lines(path):
    assert path.read_text(encoding="utf-8").count("\n") <= MAX_LINES


def test_the_stages_import_each_other_relatively():
    """Relative imports between stages, so tools reading the tree see the arrows."""
    absolute = [f"{p.relative_to(ROOT)}:{line}" for p in SOURCES for line, m in imported_modules(p)
                if m.startswith("tdbql.")]
    assert not absolute
