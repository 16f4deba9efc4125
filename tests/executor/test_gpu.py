"""CUDA against CPU fp32: every family's logits and scalars, bf16 within a stated tolerance,
ablation, patching, tracing, routes at 1,024 tokens, the compiled path (`pytest -m gpu`).

On a machine without CUDA these are skipped, except in the rehearsal of bench/gpu_check.sh
(TDBQL_GPU_REHEARSE=1), which runs them on the CPU "device" with the same code, so the GPU run
cannot fail on a typo.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from tdbql.executor.engine import Engine
from tdbql.executor.runtime.loading import load_model
from tdbql.query.plan import Ablation, NodeQuery, NodeRef, ScalarSpec, Trace
from tests.executor.engine_helpers import run
from tests.executor.test_patching import CLEAN, CORRUPT
from tests.executor.test_scalars import LOSS, prompts

pytestmark = pytest.mark.gpu
REHEARSE = bool(os.environ.get("TDBQL_GPU_REHEARSE"))
FAMILIES = ["gpt2", "neox", "neox_serial", "llama", "mistral", "qwen2"]
BF16_TOLERANCE = 0.1  # logits of a bf16 model vs fp32: absolute, on logits of order 1-10 (random weights)


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if REHEARSE:
        return "cpu"
    pytest.skip("needs CUDA (or TDBQL_GPU_REHEARSE=1 to rehearse on the CPU)")


def both(make_checkpoint, arch: str, device: str, dtype: str = "fp32"):
    folder = str(make_checkpoint(arch))
    return load_model(folder), load_model(folder, device=device, dtype=dtype)


@pytest.mark.parametrize("arch", FAMILIES)
def test_logits_on_the_device_equal_cpu_fp32(make_checkpoint, device, arch):
    cpu, gpu = both(make_checkpoint, arch, device)
    ids = torch.tensor([cpu.encode(CLEAN)])
    with torch.no_grad():
        want = cpu.model(ids)
        got = gpu.model(ids.to(device)).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", FAMILIES)
def test_bf16_logits_within_tolerance(make_checkpoint, device, arch):
    cpu, gpu = both(make_checkpoint, arch, device, "bf16")
    ids = torch.tensor([cpu.encode(CLEAN)])
    with torch.no_grad():
        want = cpu.model(ids)
        got = gpu.model(ids.to(device)).float().cpu()
    assert (got - want).abs().max() < BF16_TOLERANCE * max(1.0, float(want.abs().max()))


QUERIES = {
    "scalars": NodeQuery(mode="select", scalars=tuple(ScalarSpec(name=s) for s in
                                                       ("act", "grad", "act_times_grad", "write_norm", "direct_effect")),
                         components=("mlp", "attn", "head", "embed")),
    "ablation": NodeQuery(mode="topk", k=20, scalars=(ScalarSpec(name="act_times_grad"),),
                          ablations=(Ablation(node=NodeRef(component="attn", layer=1, index=1), value=0.0),
                                     Ablation(node=NodeRef(component="mlp", layer=0, index=3), value="mean"))),
    "trace": NodeQuery(mode="topk", k=20, scalars=(ScalarSpec(name="in_edge"),),
                       trace=Trace(node=NodeRef(component="mlp", layer=1, index=2, token=-1))),
}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", sorted(QUERIES))
def test_node_queries_on_the_device_equal_cpu(make_checkpoint, device, arch, name):
    cpu, gpu = both(make_checkpoint, arch, device)
    rows = prompts()
    want = run(Engine(cpu, batch_size=2), QUERIES[name], rows, LOSS)["result"].to_pylist()
    got = run(Engine(gpu, batch_size=2), QUERIES[name], rows, LOSS)["result"].to_pylist()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for key, value in b.items():
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, abs=1e-4, rel=1e-4), (name, key)
            else:
                assert a[key] == value, (name, key)


def test_patching_and_generation_on_the_device_equal_cpu(make_checkpoint, device):
    from tdbql.shell.session import Session

    folder = str(make_checkpoint("gpt2"))
    results = {}
    for where in ("cpu", device):
        session = Session(model=folder, device=where)
        session.execute(f'prompt "{CLEAN}" corrupt "{CORRUPT}"\ntarget " Mary" vs " John"')
        results[where] = [session.execute(q)[0].table.to_pylist() for q in
                          ("patching of head from clean", "metric patch resid.pre[1]@-1 from clean", "generate 5")]
        session.close()
    for got, want in zip(results[device], results["cpu"]):
        assert [r.get("token_id") for r in got] == [r.get("token_id") for r in want]
        for a, b in zip(got, want):
            for key, value in b.items():
                if isinstance(value, float):
                    assert a[key] == pytest.approx(value, abs=1e-4, rel=1e-4), key


def test_routes_at_1024_tokens(make_checkpoint, device):
    """12 layers x 1,024 tokens on the GPU (the target: under 2 s); 2 x 48 when rehearsing."""
    from tdbql.executor import routes
    from tdbql.query.plan import RoutesQuery

    n_layers, n_tokens = (2, 48) if device == "cpu" else (12, 1024)
    folder = str(make_checkpoint("gpt2", n_layer=n_layers, n_positions=max(64, n_tokens)))
    loaded = load_model(folder, device=device)
    text = " ".join(["Mary and John went to the store"] * (n_tokens // 4))
    ids = loaded.encode(text)[:n_tokens]
    text = loaded.tokenizer.decode(ids)
    rows = [prompts([text])[0]]
    start = time.perf_counter()
    tables = routes.routes(loaded, RoutesQuery(), rows)
    seconds = time.perf_counter() - start
    print(f"routes: {n_layers} layers x {len(loaded.encode(text))} tokens in {seconds:.2f} s on {device}")
    assert tables["route_nodes"].num_rows > 0


def test_the_compiled_path_on_the_device(make_checkpoint, device):
    cpu, gpu = both(make_checkpoint, "gpt2", device)
    query = NodeQuery(mode="topk", k=20, scalars=(ScalarSpec(name="act_times_grad"),))
    rows = prompts()
    want = run(Engine(cpu, batch_size=2), query, rows, LOSS)["result"]
    got = run(Engine(gpu, batch_size=2, compile=True), query, rows, LOSS)["result"]
    assert got.column("act_times_grad").to_pylist() == pytest.approx(
        want.column("act_times_grad").to_pylist(), abs=1e-4, rel=1e-4)
