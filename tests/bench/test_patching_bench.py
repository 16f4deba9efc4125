"""bench/patching_sweeps.py at its small size (2 layers, d_model 64), so the script cannot rot.

With TransformerLens installed (`pip install -e '.[bench]'`), the script's own comparison runs
end to end and every cell of tdbql's sweeps must equal `transformer_lens.patching`'s. Without it,
tdbql's batched sweeps are still checked against its one-variant-per-forward form and against
what patching must give at positions the corrupt prompt shares with the clean one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import patching_sweeps as P  # noqa: E402

HAS_TL = importlib.util.find_spec("transformer_lens") is not None


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return P.make_checkpoint("small", tmp_path_factory.mktemp("patching-bench"))


@pytest.mark.skipif(not HAS_TL, reason="transformer-lens is not installed (pip install -e '.[bench]')")
def test_small_bench_tdbql_equals_transformer_lens(folder, tmp_path):
    out = tmp_path / "small.json"
    assert P.main(["--small", "--repeats", "1", "--data", str(folder.parent), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("bench/patching_sweeps.py --small")
    assert report["tdbql_batch_size"]["tdbql_batch_size_1"] == 1
    assert set(report["sweeps"]) == set(P.SWEEPS)
    n_tokens = report["prompt"]["tokens"]
    expected_shapes = {"resid_pre_by_position": [2, n_tokens], "head_all_positions": [2, 4]}
    for name, sweep in report["sweeps"].items():
        assert sweep["grid_shape"] == expected_shapes[name]
        assert sweep["equal"], sweep
        for key in ("comparison", "comparison_batch_size_1"):
            c = sweep[key]
            assert c["cells"] == np.prod(expected_shapes[name])
            assert c["max_abs_diff_metric_patched"] < 1e-5, c
            assert c["max_abs_diff_metric_clean"] < 1e-5, c
            # the check can see a wrong cell: patching moves the metric far more than the tolerance
            assert c["effect_range"] > 100 * max(c["max_abs_diff_metric_patched"], 1e-7), c
        assert set(sweep["ratios"]) == {"tdbql/tl", "tdbql_batch_size_1/tl"}
        assert all(len(v) == 1 and v[0] > 0 for v in sweep["seconds"].values())


@pytest.mark.skipif(not HAS_TL, reason="transformer-lens is not installed (pip install -e '.[bench]')")
def test_compare_sees_a_misplaced_cell(folder):
    """A grid with two positions swapped (a misaligned patch) fails the script's check."""
    import torch

    session, bridge = P.tdbql_session(folder), P.tl_bridge(folder)
    ids = [torch.tensor([session.loaded.encode(t)]) for t in (P.CLEAN, P.CORRUPT)]
    target, distractor = (session.loaded.encode(w)[0] for w in (P.TARGET, P.DISTRACTOR))
    shape = (2, ids[0].shape[1])
    tdbql = P.tdbql_sweep(session, P.SWEEPS["resid_pre_by_position"][0], "position", shape)
    tl = P.tl_sweep(bridge, "get_act_patch_resid_pre", *ids, target, distractor)
    assert P.agrees(P.compare(tdbql, tl), atol=1e-5)
    swapped = _swapped_position(tdbql, _swap_position(ids))
    assert not P.agrees(P.compare(swapped, tl), atol=1e-5)


def test_batched_sweeps_equal_one_variant_per_forward(folder):
    batched, single = P.tdbql_session(folder), P.tdbql_session(folder, batch_size=1)
    assert P.tdbql_batch_size(batched) > 1 and P.tdbql_batch_size(single) == 1
    n_tokens = len(batched.loaded.encode(P.CLEAN))
    for query, _, axis in P.SWEEPS.values():
        shape = (2, n_tokens if axis == "position" else 4)
        a, b = P.tdbql_sweep(batched, query, axis, shape), P.tdbql_sweep(single, query, axis, shape)
        np.testing.assert_allclose(a["grid"], b["grid"], rtol=0, atol=1e-5)


def test_resid_pre_patch_at_shared_and_swapped_positions(folder):
    """Layer 0's resid.pre at the swapped name carries the whole clean run (the prompts differ
    nowhere else); before it the two runs are the same, so patching there changes nothing."""
    session = P.tdbql_session(folder)
    ids = [session.loaded.encode(t) for t in (P.CLEAN, P.CORRUPT)]
    swap = _swap_position(ids)
    out = P.tdbql_sweep(session, P.SWEEPS["resid_pre_by_position"][0], "position", (2, len(ids[0])))
    assert abs(out["clean"] - out["corrupt"]) > 1e-4
    assert out["grid"][0, swap] == pytest.approx(out["clean"], abs=1e-5)
    np.testing.assert_allclose(out["grid"][:, :swap], out["corrupt"], rtol=0, atol=1e-5)


def _swap_position(ids) -> int:
    [position] = [t for t, (a, b) in enumerate(zip(*[list(np.ravel(x)) for x in ids], strict=True)) if a != b]
    return position


def _swapped_position(result: dict, position: int) -> dict:
    grid = result["grid"].copy()
    grid[:, [position, position + 1]] = grid[:, [position + 1, position]]
    return {**result, "grid": grid}
