"""bench/gpu_check.sh cannot rot between GPU runs: its rehearsal (the same steps on the CPU at
tiny sizes) runs here and must pass every step and write its results under $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu_check.sh"


def test_the_gpu_check_rehearsal_passes_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), "--rehearse"], env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0, log
    assert "summary: every step passed" in log
    assert json.loads((tmp_path / "environment.json").read_text())["device"] == "cpu"
    assert "passed" in (tmp_path / "gpu_tests.log").read_text()
    for workload in ("W1", "W2", "W3", "W4"):
        assert json.loads((tmp_path / f"harness_{workload}.json").read_text())
