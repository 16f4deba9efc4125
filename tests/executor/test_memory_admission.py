"""Memory admission (executor/memory.py): the estimate counts the result rows a query keeps
across batches, matches the process's measured peak RSS within 1.5x, and a query that cannot fit
is refused before any work, naming the estimate, the limit and the knobs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tdbql.executor import engine as engine_module
from tdbql.executor import memory
from tdbql.grammar.parse import parse
from tdbql.query.errors import TdbqlError
from tdbql.shell.session import Session

NAMES = ["Mary", "John", "Anna", "Bob", "Tom", "Kate"]


def ioi(n: int) -> str:
    """`prompt ...` of n IOI prompts of equal length (14 tokens on the embedded model)."""
    texts = ", ".join(f'"When {NAMES[i % 6]} and {NAMES[(i + 1) % 6]} went to the store, {NAMES[(i + 1) % 6]} '
                      f'gave a drink to"' for i in range(n))
    return f'prompt {texts}; target " Mary" vs " John"'


@pytest.fixture(scope="module")
def session():
    s = Session()
    yield s
    s.close()


def estimate_of(session: Session, query: str, monkeypatch) -> memory.MemoryEstimate:
    seen = []

    def spy(estimate, batch_size, **kwargs):
        seen.append(estimate)
        return memory.admit(estimate, batch_size, **kwargs)

    monkeypatch.setattr(engine_module, "admit", spy)
    session.execute(query)
    return seen[-1]


# --- the rows a query keeps ---


@pytest.mark.parametrize("query", [
    "select act of attn", "select act, grad of attn where layer in 1..2 and head = 3",
    "select act of mlp where token = -1 and unit < 100", "select act of attn where attended = 0 and token >= 5",
    "select act of mlp_sae where prompt in (0, 2) and layer = 3", "select act where component = mlp and layer = 0",
    "select act of head, embed where token in -3..-1", "select act_times_grad of attn over prompts mean",
    "select act of mlp where head = 1", "topk 7 act by prompt, layer", "topk 3 act_times_grad by token",
])
def test_the_estimated_rows_are_the_rows(session, query, monkeypatch):
    session.execute(f'{ioi(2)}; prompt "The cat sat", "When Mary and John went to the store", "A B C D A B"')
    estimate = estimate_of(session, query, monkeypatch)
    assert estimate.result_rows == session.con.sql("SELECT count(*) FROM _").fetchall()[0][0]


def test_scalar_conditions_are_counted_as_passing(session, monkeypatch):
    session.execute(ioi(2))
    estimate = estimate_of(session, "select act of mlp where layer = 0 and act > 1", monkeypatch)
    assert estimate.result_rows == 2 * 14 * 512  # an upper bound: the scalar filter is not known ahead
    assert session.con.sql("SELECT count(*) FROM _").fetchall()[0][0] < estimate.result_rows


def test_results_grow_with_the_prompts_and_batches_do_not(session, monkeypatch):
    sizes = {}
    for n in (4, 8, 16):
        session.execute(f"{ioi(n)}; set batch_size = 4")
        sizes[n] = estimate_of(session, "select act, grad of attn where layer = 0", monkeypatch)
    session.execute("set batch_size = auto")
    assert sizes[16].results - sizes[8].results == 2 * (sizes[8].results - sizes[4].results) > 0
    assert sizes[16].per_prompt == sizes[4].per_prompt
    assert sizes[16].need(4) > sizes[4].need(4)


# --- refusal and the batch size that fits ---


def test_a_query_over_the_limit_is_refused_before_it_starts(session, monkeypatch):
    session.execute(f"{ioi(40)}; set memory_limit = '20MB'")
    monkeypatch.setattr(engine_module, "node_blocks", lambda *a, **k: pytest.fail("the query ran"))
    started = time.perf_counter()
    with pytest.raises(TdbqlError) as caught:
        session.execute("select act, grad of attn as too_big")
    message = caught.value.message
    assert time.perf_counter() - started < 5
    assert message.startswith("this query would need about ") and "67,200 result rows" in message
    assert "more than the 19.1 MiB of memory_limit" in message
    for knob in ("`where`", "`topk` instead of `select`", "`by`", "`set batch_size`", "`set memory_limit"):
        assert knob in message
    assert "too_big" not in session.table_names()
    session.execute("set memory_limit = auto")


def test_an_automatic_batch_shrinks_to_fit_a_limit():
    batches = []
    s = Session(progress=lambda done, total: batches.append(total))
    try:
        s.execute(ioi(32))
        s.execute("topk 5 act_times_grad")
        assert batches[-1] == 1  # 32 prompts in one batch
        per_prompt = 1.7 * 2**20  # about what one prompt of this query takes (explain)
        s.execute(f"set memory_limit = {int(6 * per_prompt + 4 * 2**20)}")
        s.execute("topk 5 act_times_grad")
        assert 4 <= batches[-1] <= 16
        s.execute("set batch_size = 32")  # an explicit batch is the user's: refused, not shrunk
        with pytest.raises(TdbqlError, match="batches of 32 prompts"):
            s.execute("topk 5 act_times_grad")
    finally:
        s.close()


def test_without_a_limit_the_machines_memory_is_the_limit(session, monkeypatch):
    session.execute(ioi(4))
    monkeypatch.setattr(engine_module, "available_memory", lambda device: (2**20, "available (MemAvailable), less a margin"))
    with pytest.raises(TdbqlError, match=r"more than the 1\.0 MiB available \(MemAvailable\), less a margin"):
        session.execute("select act of mlp")


def test_on_cuda_the_batches_meet_the_device_and_the_results_the_host(session, monkeypatch):
    """The GPU's free memory bounds the batches; the result rows, gathered on the host, RAM."""
    session.execute(ioi(8))
    asked = []

    def room(device):
        asked.append(device.type)
        return (10 * 2**30, "free on cuda") if device.type == "cuda" else (2**20, "available (MemAvailable)")

    monkeypatch.setattr(engine_module, "available_memory", room)
    monkeypatch.setattr(session.loaded, "device", torch.device("cuda"))
    engine = session._engine()
    bound = session._bind(*parse("select act of mlp")[0], "select act of mlp")
    plan = engine.plan(bound, session.prompts)
    with pytest.raises(TdbqlError, match=r"more than the 1\.0 MiB available \(MemAvailable\)"):
        engine.admit(plan, session.prompts, 8)
    device_room = {"cuda": 2**20}
    monkeypatch.setattr(engine_module, "available_memory",
                        lambda d: (device_room.get(d.type, 10 * 2**30), f"free on {d.type}"))
    assert 1 <= engine.admit(plan, session.prompts, 8) < 8  # the automatic batch shrinks to the device
    device_room["cuda"] = 1024
    with pytest.raises(TdbqlError, match=r"batches of 8 prompts: .*more than the 1.0 KiB free on cuda"):
        engine.admit(plan, session.prompts, 8)
    assert asked == ["cpu"]


def test_memory_limit_values_are_checked(session):
    for bad in ("'lots'", "-5", "'8 XB'"):
        with pytest.raises(TdbqlError, match="memory_limit is a size such as '8GB'"):
            session.execute(f"set memory_limit = {bad}")
    assert session.execute("set memory_limit = '1.5 GiB'")[0].message == "memory_limit = 1.5 GiB"
    assert session.settings.memory_limit == int(1.5 * 2**30)
    session.execute("set memory_limit = auto")
    assert session.settings.memory_limit is None


def test_available_memory_reads_meminfo_and_the_cgroup(tmp_path, monkeypatch):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    8388608 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "nothing")
    room, source = memory.available_memory(torch.device("cpu"))
    assert room == 8 * 2**30 - 8 * 2**30 // 10 and source.startswith("available (MemAvailable)")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{3 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{2 * 2**30}\n")
    (cgroup / "memory.stat").write_text(f"anon 5\ninactive_file {2**29}\n")
    monkeypatch.setattr(memory, "CGROUP", cgroup)
    room, source = memory.available_memory(torch.device("cpu"))
    assert room == 2**30 + 2**29 - memory.MARGIN and source.startswith("left under the cgroup's memory limit")
    (cgroup / "memory.max").write_text("max\n")
    assert memory.available_memory(torch.device("cpu"))[0] == 8 * 2**30 - 8 * 2**30 // 10


# --- the estimate against the process's peak RSS ---

_MEASURE = textwrap.dedent("""
    import ctypes, gc, json, sys
    from tdbql.executor import engine, memory
    from tdbql.shell.session import Session

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    session = Session()
    session.execute(sys.argv[1])
    session.execute("topk 1 act where prompt = 0")  # warm: the model, the engine, DuckDB
    seen = []

    def spy(estimate, batch_size, **kwargs):
        batch = memory.admit(estimate, batch_size, **kwargs)
        seen.append(estimate.need(batch))
        return batch

    engine.admit = spy
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # measure from a heap without free memory to reuse
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here
    rows = session.execute(sys.argv[2])[-1].table.num_rows
    print(json.dumps({"estimate": seen[-1], "measured": status("VmHWM") - base, "rows": rows}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("n, query", [
    (150, "select act, grad of attn"),  # results: 252,000 rows
    (10, "select act of mlp where layer in 0..1"),
    (200, "topk 20 act_times_grad by prompt"),  # latents tied at zero in each prompt's group
    (64, "topk 10 act_times_grad of mlp"),  # batches: the backward's saved tensors
])
def test_the_estimate_is_within_one_and_a_half_times_the_peak_rss(n, query):
    done = subprocess.run([sys.executable, "-c", _MEASURE, ioi(n), query], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    ratio = figures["estimate"] / figures["measured"]
    assert 1 / 1.5 <= ratio <= 1.5, figures
