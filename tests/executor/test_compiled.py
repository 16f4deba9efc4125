"""The compiled fast path (`set compile = on`): same values as plain autograd, graphs reused on
repeated shapes, eager fallback for the plans it does not cover."""

from __future__ import annotations

import pytest
import torch
from tdbql.executor.compiled import refusal
from tdbql.executor.engine import Engine
from tdbql.query.errors import TdbqlError
from tdbql.query.plan import Ablation, NodeQuery, NodeRef, ScalarSpec
from tdbql.shell.session import Session

from tests.executor.engine_helpers import explain, plan, run
from tests.executor.test_scalars import (
    LOSS,
    SCALARS,
    assert_matches,
    engine_rows,
    prompts,
    random_sae,
    reference_table,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def select(*scalars, components=None):
    return NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in scalars), components=components)


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled_gpt2(make_checkpoint):
    """A tiny GPT-2 and a compiling engine over it."""
    from tdbql.executor.runtime.loading import load_model

    loaded = load_model(str(make_checkpoint("gpt2")))
    return loaded, Engine(loaded, batch_size=3, compile=True)


def test_compiled_scalars_equal_plain_autograd_on_a_padded_batch(compiled_gpt2):
    loaded, engine = compiled_gpt2
    rows = prompts()  # three prompts of different lengths: one right-padded batch
    components = ("mlp", "attn", "head", "embed")
    got = _rows(run(engine, select(*SCALARS, components=components), rows, LOSS)["result"])
    assert_matches(got, reference_table(loaded, rows), SCALARS, components)


def test_compiled_autoencoder_latents_equal_the_eager_engine(tiny_model):
    loaded = tiny_model("gpt2")
    cfg = loaded.config
    loaded.attach_sae("mlp", 0, random_sae("mlp", 0, cfg.d_mlp, 24, 1))
    loaded.attach_sae("resid", cfg.n_layers - 1, random_sae("resid", cfg.n_layers - 1, cfg.d_model, 16, 3))
    rows = prompts()
    query = select("act", "grad", "act_times_grad", "sae_error", components=("mlp_sae", "resid_sae"))
    got = _rows(run(Engine(loaded, batch_size=3, compile=True), query, rows, LOSS)["result"])
    want = engine_rows(loaded, query, rows, batch_size=3)
    assert set(got) == set(want)
    for scalar in ("act", "grad", "act_times_grad", "sae_error"):
        # fused kernels round differently: compare to 1e-5 of the scalar's largest magnitude
        tol = 1e-5 * max([1.0] + [abs(row[scalar]) for row in want.values() if row[scalar] is not None])
        for key, row in want.items():
            if row[scalar] is None:
                assert got[key][scalar] is None
            else:
                assert abs(got[key][scalar] - row[scalar]) <= tol, (key, scalar, got[key][scalar], row[scalar])


def test_a_repeated_query_reuses_the_compiled_graph(compiled_gpt2):
    _, engine = compiled_gpt2
    rows = prompts()
    query = NodeQuery(mode="topk", k=5, scalars=(ScalarSpec(name="act_times_grad"),))
    first = run(engine, query, rows, LOSS)["result"]
    graphs = unique_graphs()
    again = run(engine, query, rows, LOSS)["result"]
    assert unique_graphs() == graphs
    assert again.equals(first)


def test_plans_it_does_not_cover_run_eagerly(compiled_gpt2):
    loaded, engine = compiled_gpt2
    rows = prompts()
    ablate = Ablation(node=NodeRef(component="mlp", layer=0, index=3), value=0.0)
    query = NodeQuery(mode="topk", k=5, scalars=(ScalarSpec(name="act_times_grad"),), ablations=(ablate,))
    node_plan = plan(engine, query, rows, LOSS)
    assert refusal(node_plan) == "ablation"
    assert "execution: eager (compile does not cover a ablation)" in explain(engine, query, rows, LOSS)
    graphs = unique_graphs()
    got = run(engine, query, rows, LOSS)["result"]
    assert unique_graphs() == graphs
    assert got.equals(run(Engine(loaded, batch_size=3), query, rows, LOSS)["result"])


def test_explain_names_the_compiled_path(compiled_gpt2):
    _, engine = compiled_gpt2
    text = explain(engine, NodeQuery(mode="topk", k=5, scalars=(ScalarSpec(name="act_times_grad"),)), prompts(), LOSS)
    assert "execution: torch.compile" in text and "zero probe" in text
    assert "requires_grad_()" not in text


def test_a_compiler_failure_is_a_tdbql_error_that_names_the_way_out(tiny_model, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine(tiny_model("gpt2"), compile=True)
    query = NodeQuery(mode="topk", k=5, scalars=(ScalarSpec(name="act_times_grad"),))
    with pytest.raises(TdbqlError, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\); `set compile = off`"):
        run(engine, query, prompts(), LOSS)


def test_session_setting_switches_the_engine():
    session = Session()
    assert session.execute("set compile = on")[-1].message == "compile = True"
    assert session._engine().compiled is not None
    session.execute("set compile = off")
    assert session._engine().compiled is None
    with pytest.raises(TdbqlError, match="compile"):
        session.execute("set compile = sometimes")


def _rows(table) -> dict:
    return {(r["prompt_id"], r["component"], r["layer"], r["unit"], r["position"], r["attended"]): r
            for r in table.to_pylist()}
