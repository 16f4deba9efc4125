"""Suite-wide switches."""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    """`pytest -m slow` asks for the long profiles: the fuzzer's (tests/test_fuzz_cli.py) reads
    TDBQL_FUZZ_LONG when its module is imported, after this runs."""
    expression = (config.option.markexpr or "").replace(" ", "")
    if expression == "slow":
        os.environ.setdefault("TDBQL_FUZZ_LONG", "1")
