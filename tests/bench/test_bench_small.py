"""The benchmark harness in a tiny form: a 2-layer d_model 64 random GPT-2, W1 and W2 on CPU.

No timing assertions: this checks that the harness runs end to end, writes the results JSON,
and that every contender returns the same top-20 nodes as the plain-transformers floor.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import contenders as C  # noqa: E402
import harness  # noqa: E402

HAS_TL = importlib.util.find_spec("transformer_lens") is not None


def test_tiny_bench_contenders_agree(tmp_path):
    contenders = ["floor", "tdbql"] + (["tl"] if HAS_TL else [])
    out = tmp_path / "tiny.json"
    argv = ["--model", "tiny", "--data", str(tmp_path / "data"), "--device", "cpu", "--dtypes", "fp32",
            "--workloads", "W1,W2", "--shape", "W1=1x12", "--shape", "W2=4x16", "--contenders", ",".join(contenders),
            "--repeats", "1", "--warmup", "0", "--in-process", "--strict", "--out", str(out)]
    assert harness.main(argv) == 0
    report = json.loads(out.read_text())
    assert {"date_utc", "torch", "device"} <= set(report["environment"])
    assert report["command"].startswith("bench/harness.py")
    assert [s["workload"] for s in report["summary"]] == ["W1", "W2"]
    for summary in report["summary"]:
        assert not summary["errors"]
        assert summary["all_agree"], summary["agreement_with_floor"]
        assert set(summary["agreement_with_floor"]) == set(contenders) - {"floor"}
        assert "time tdbql/floor" in summary["ratios"]
    for run in report["runs"]:
        assert len(run["keys"]) == 20
        kinds = {key[2] for key in run["keys"]}
        assert kinds <= {"mlp", "attn"}


def test_floor_keys_are_the_brute_force_top20(tmp_path):
    """The floor's running top-k equals sorting every act x grad value of one pass by hand."""
    import torch

    folder = C.make_checkpoint("tiny", root=tmp_path)
    w = C.workload("W2", "3x10", batch_size=2)  # two batches, so the running merge is exercised
    prompts = C.make_prompts(w, vocab_size=512)
    floor = C.Floor(folder, "fp32", "cpu")
    keys = floor.run(prompts, w)

    every = {}
    for first, ids, lengths in C.batches(prompts, 2, "cpu"):
        everything = C.TopK(k=10**9, by_prompt=False)
        floor.batch(first, ids, lengths, everything)
        every.update(everything.result())
    expected = dict(sorted(every.items(), key=lambda kv: -kv[1])[:20])
    assert keys.keys() == expected.keys()
    n_mlp = 2 * sum(len(p) for p in prompts.token_ids) * 256
    n_attn = 2 * 4 * sum(len(p) * (len(p) + 1) // 2 for p in prompts.token_ids)
    assert len(every) == n_mlp + n_attn  # every valid node once: causal pairs only, no padding
    assert torch.isfinite(torch.tensor(list(every.values()))).all()


def test_compare_reports_mismatches():
    a = {(0, 1, "mlp", 5, 3, -1): 2.0, (0, 0, "attn", 1, 3, 2): 1.0}
    b = {(0, 1, "mlp", 5, 3, -1): 2.0, (0, 0, "attn", 1, 3, 1): 0.9}
    result = C.compare(a, b)
    assert not result["equal"]
    assert result["missing"] == [[0, 0, "attn", 1, 3, 2]]
    assert result["extra"] == [[0, 0, "attn", 1, 3, 1]]
    assert result["reference_kth_value"] == 1.0
    assert C.compare(a, dict(a))["equal"]


@pytest.mark.parametrize("text, expected", [("32x128", (32, 128, 128)), ("100x16-64", (100, 16, 64))])
def test_parse_shape(text, expected):
    assert C.parse_shape(text) == expected
