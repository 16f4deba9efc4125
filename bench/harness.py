"""Side-by-side benchmark of `topk 20 act_times_grad` (bench/README.md has the how and why).

    python bench/harness.py --model gpt2-small --device cuda --dtypes fp32,bf16 \
        --workloads W1,W2,W3,W4 --name gpu-h100
    python bench/harness.py --model gpt2-small --device cpu --workloads W1,W2 --shape W2=8x128 --name cpu
    python bench/harness.py --embedded --name cpu-embedded        # the shipped model: cold start, warm query
    python bench/harness.py --plot bench/results/cpu.json --out docs/performance.png

Each (dtype, workload, contender) runs in its own subprocess (`--worker`), so peak memory is that
contender's alone: CUDA `max_memory_allocated` above what was allocated before the timed runs, or
on CPU the growth of the process's peak RSS (`VmHWM`, reset through /proc/self/clear_refs before
each timed run) above its RSS then. Times are medians of `--repeats` runs after `--warmup` runs
(CUDA synchronised around each). All contenders must return the same top-k keys as the floor;
`--strict` makes a disagreement in fp32 fail the run (bf16 rounding may reorder near-ties, which
are reported with their distance from the k-th value).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import contenders as C  # noqa: E402

RESULTS = HERE / "results"


# --- measuring -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


class Meter:
    """Wall time and peak memory of one call, on CUDA or CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def measure(self, fn):
        """-> (result, seconds, peak bytes above the memory in use when the call started)."""
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            base = self.torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        result = fn()
        self.sync()
        seconds = time.perf_counter() - t0
        if self.cuda:
            peak = self.torch.cuda.max_memory_allocated() - base
        else:
            peak = _status_kib("VmHWM") * 1024 - base
        return result, seconds, peak


# --- worker: one contender, one workload, one dtype -----------------------------------------------


def end_to_end(contender, text: str, w: C.Workload):
    """From text to a DuckDB table: what an interactive user waits for (W1)."""
    if isinstance(contender, C.Tdbql):
        return _tdbql_session_query(contender, text, w)
    ids = contender.tokenizer.encode(text).ids
    keys = contender.run(C.PromptSet([ids]), w)
    _to_duckdb(contender.con, keys)
    return keys


def _tdbql_session_query(contender, text: str, w: C.Workload):
    results = contender.session.execute(f'prompt "{text}"\n{w.query()}')
    return C.table_keys(results[-1].table)


def _to_duckdb(con, keys) -> None:
    import pyarrow as pa

    rows = C.keys_json(keys)
    names = ["prompt_id", "layer", "component", "unit", "position", "attended", "act_times_grad"]
    arrow_rows = pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})  # noqa: F841 (DuckDB reads it)
    con.execute("CREATE OR REPLACE TABLE result AS SELECT * FROM arrow_rows")


def dataset_run(contender, prompts: C.PromptSet, w: C.Workload, out_dir: Path):
    """Prompt set to Parquet (W4)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(contender, C.Tdbql):
        table = contender.table(prompts, w)
        keys = C.table_keys(table)
    else:
        keys = contender.run(prompts, w)
        rows = C.keys_json(keys)
        names = ["prompt_id", "layer", "component", "unit", "position", "attended", "act_times_grad"]
        table = pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})
    pq.write_table(table, out_dir / f"{contender.name}.parquet")
    return keys


def prepare_end_to_end(contender, folder: Path, w: C.Workload, dtype: str, device: str) -> None:
    import duckdb
    from tokenizers import Tokenizer

    if isinstance(contender, C.Tdbql):
        from tdbql.shell.session import Session

        contender.session = Session(model=str(folder), device=device, dtype=dtype, batch_size=w.batch_size,
                                    compile=contender.compile)
        contender.session.execute(f'target " {C.token_name(C.TARGET)}" vs " {C.token_name(C.DISTRACTOR)}"')
        contender.loaded = contender.session.loaded  # the session loaded its own copy; free the worker's
    else:
        contender.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        contender.con = duckdb.connect()


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.checkpoint)
    w = C.workload(args.workload, args.shape, args.batch_size)
    vocab = C.describe_checkpoint(folder)["vocab_size"]
    prompts = C.make_prompts(w, vocab, seed=args.seed)
    meter = Meter(args.device)
    t0 = time.perf_counter()
    contender = C.CONTENDERS[args.contender](folder, args.dtype, args.device)
    load_s = time.perf_counter() - t0
    out_dir = Path(tempfile.mkdtemp(prefix="tdbql-bench-"))
    if w.end_to_end:
        prepare_end_to_end(contender, folder, w, args.dtype, args.device)
        call = lambda: end_to_end(contender, prompts.texts[0], w)  # noqa: E731
    elif w.by_prompt:
        call = lambda: dataset_run(contender, prompts, w, out_dir)  # noqa: E731
    else:
        call = lambda: contender.run(prompts, w)  # noqa: E731
    load_before = os.getloadavg()[0]
    first_call_s = None
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        call()
        first_call_s = time.perf_counter() - t0 if first_call_s is None else first_call_s
    times, peaks, keys = [], [], None
    for _ in range(args.repeats):
        keys, seconds, peak = meter.measure(call)
        times.append(seconds)
        peaks.append(peak)
    median = statistics.median(times)
    return {
        "contender": args.contender,
        "workload": w.name,
        "shape": w.shape,
        "batch_size": w.batch_size,
        "query": w.query(),
        "dtype": args.dtype,
        "load_s": load_s,
        "first_call_s": first_call_s,  # the first warm-up call (includes compiling, if any)
        "times_s": times,
        "median_s": median,
        "tokens_per_s": prompts.n_tokens / median,
        "peak_bytes": max(peaks),
        "peak_bytes_runs": peaks,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "torch_threads": torch.get_num_threads(),
        "keys": C.keys_json(keys),
    }


# --- parent: every contender, compare, write JSON ----------------------------------------------------


# On CPU, glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so after a warm-up
# run the RSS already holds the run's scratch memory and a peak-RSS delta would read near zero. The
# memory pass therefore runs in a separate process where every allocation of 64 KiB or more is its
# own mapping, returned to the system when freed: RSS then tracks live tensors. It is not used for
# timing, since the extra page faults slow every contender down.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_worker(args, contender: str, dtype: str, workload: str, folder: Path) -> dict:
    result = _spawn_worker(args, contender, dtype, workload, folder, args.repeats_for(workload), args.warmup)
    if args.device.startswith("cuda") or args.in_process or "error" in result:
        return result
    memory = _spawn_worker(args, contender, dtype, workload, folder, 1, 1, env=CPU_MEMORY_ENV)
    result["peak_bytes_timing_process"] = result["peak_bytes"]
    if "error" in memory:
        result["memory_error"] = memory["error"]
    else:
        result["peak_bytes"] = memory["peak_bytes"]
        result["memory_keys_equal"] = memory["keys"] == result["keys"]
    return result


def _spawn_worker(args, contender, dtype, workload, folder, repeats, warmup, env=None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--contender", contender, "--dtype", dtype,
           "--device", args.device, "--workload", workload, "--checkpoint", str(folder),
           "--repeats", str(repeats), "--warmup", str(warmup), "--seed", str(args.seed)]
    if args.shape_for(workload):
        cmd += ["--shape", args.shape_for(workload)]
    if args.batch_for(workload):
        cmd += ["--batch-size", str(args.batch_for(workload))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.in_process:
        return worker(parse_args(cmd[2:]))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    proc = subprocess.run(cmd + ["--worker-out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if proc.returncode != 0:
        return {"contender": contender, "workload": workload, "dtype": dtype,
                "error": (proc.stderr or proc.stdout).strip().splitlines()[-12:]}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def summarise(runs: list[dict], strict_dtypes: set[str]) -> list[dict]:
    """Per (dtype, workload): agreement with the floor and the ratios."""
    rows = []
    for dtype in dict.fromkeys(r["dtype"] for r in runs):
        for workload in dict.fromkeys(r["workload"] for r in runs if r["dtype"] == dtype):
            group = {r["contender"]: r for r in runs if r["dtype"] == dtype and r["workload"] == workload}
            rows.append(_summary(dtype, workload, group, dtype in strict_dtypes))
    return rows


def _summary(dtype: str, workload: str, group: dict[str, dict], strict: bool) -> dict:
    ok = {name: r for name, r in group.items() if "error" not in r}
    row = {"dtype": dtype, "workload": workload, "errors": {n: r["error"] for n, r in group.items() if "error" in r}}
    row["shape"] = next((r["shape"] for r in ok.values()), None)
    row["median_s"] = {n: r["median_s"] for n, r in ok.items()}
    row["min_s"] = {n: min(r["times_s"]) for n, r in ok.items()}  # the least disturbed run (shared CPUs)
    row["peak_mib"] = {n: r["peak_bytes"] / 2**20 for n, r in ok.items()}
    row["tokens_per_s"] = {n: r["tokens_per_s"] for n, r in ok.items()}
    reference = ok.get("floor")
    if reference is not None:
        ref_keys = C.keys_from_json(reference["keys"])
        row["agreement_with_floor"] = {n: C.compare(ref_keys, C.keys_from_json(r["keys"]))
                                       for n, r in ok.items() if n != "floor"}
        row["all_agree"] = all(a["equal"] for a in row["agreement_with_floor"].values())
        if strict and not row["all_agree"]:
            row["strict_failure"] = True
    t, m = row["median_s"], row["peak_mib"]
    ratios = {}
    for a, b in (("tdbql", "floor"), ("tl", "tdbql"), ("tl_all", "tdbql"), ("tl", "floor")):
        if a in t and b in t:
            ratios[f"time {a}/{b}"] = t[a] / t[b]
            if m.get(b):
                ratios[f"peak memory {a}/{b}"] = m[a] / m[b]
    row["ratios"] = ratios
    return row


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_name(),
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "device": device,
    }
    try:
        from importlib.metadata import version

        env["transformer_lens"] = version("transformer-lens")
        env["tdbql"] = version("tdbql")
    except Exception as err:  # a missing distribution is recorded, not fatal
        env["version_error"] = str(err)
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=C.REPO, capture_output=True,
                                           text=True).stdout.strip()
    except OSError:
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bench(args, out: Path) -> dict:
    folder = C.make_checkpoint(args.model, seed=args.seed, root=Path(args.data))
    report = {"name": args.name, "command": args.command, "environment": environment(args.device),
              "model": {"shape": args.model, **C.describe_checkpoint(folder), "checkpoint": str(folder)},
              "notes": args.note, "runs": []}
    for dtype in args.dtypes:
        for workload in args.workloads:
            for contender in args.contenders:
                result = run_worker(args, contender, dtype, workload, folder)
                report["runs"].append(result)
                _progress(result)
                report["summary"] = summarise(report["runs"], strict_dtypes=set())
                _write(out, report)  # partial results survive an interrupted run
    report["summary"] = summarise(report["runs"], strict_dtypes={"fp32"} if args.strict else set())
    report["environment"]["loadavg_end"] = os.getloadavg()
    return report


def _write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


def _progress(result: dict) -> None:
    if "error" in result:
        print(f"{result['dtype']} {result['workload']} {result['contender']}: ERROR {result['error'][-1]}",
              file=sys.stderr, flush=True)
        return
    print(f"{result['dtype']} {result['workload']} {result['shape']} {result['contender']}: "
          f"median {result['median_s'] * 1000:.1f} ms, peak {result['peak_bytes'] / 2**20:.0f} MiB",
          file=sys.stderr, flush=True)


# --- the embedded model: cold start and a warm REPL query ---------------------------------------------

EMBEDDED_QUERY = ('prompt "When Mary and John went to the store, John gave a drink to"; '
                  'target " Mary" vs " John"; topk 20 act_times_grad')


def embedded(args) -> dict:
    """Cold start: process start to table printed (`tdbql -c ...`); warm: the second
    Session.execute of the same query in one process."""
    cli = Path(sys.executable).with_name("tdbql")
    cold = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        proc = subprocess.run([str(cli), "--model", args.embedded_model, "-c", EMBEDDED_QUERY],
                              capture_output=True, text=True)
        cold.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-5:], "command": proc.args}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, duckdb, pyarrow"], check=True)
    import_baseline = time.perf_counter() - t0
    (first, warm, info), (compiled_first, compiled_warm, _) = _session_query_times(args)
    return {
        "query": EMBEDDED_QUERY,
        "cold_start_command": f"{cli} --model {args.embedded_model} -c {shlex.quote(EMBEDDED_QUERY)}",
        "cold_start_stdout_tail": proc.stdout.strip().splitlines()[-3:],
        "cold_start_s": cold, "cold_start_median_s": statistics.median(cold),
        "python_import_torch_duckdb_pyarrow_s": import_baseline,
        "first_query_in_session_s (includes model load)": first,
        "warm_query_s": warm, "warm_query_median_s": statistics.median(warm),
        "compiled_first_query_s (set compile = on; includes model load and compiling)": compiled_first,
        "compiled_warm_query_s": compiled_warm, "compiled_warm_query_median_s": statistics.median(compiled_warm),
        "model": info.model_dump(),
    }


def _session_query_times(args):
    """Per session (eager, then `compile = on`): the first query in a fresh Session (model load
    and compiling included), then `repeats` warm queries, the two sessions' runs interleaved so
    that both see the same machine load."""
    from tdbql.shell.session import Session

    sessions = [Session(model=args.embedded_model, compile=compile) for compile in (False, True)]
    firsts = []
    for session in sessions:
        t0 = time.perf_counter()
        session.execute(EMBEDDED_QUERY)
        firsts.append(time.perf_counter() - t0)
    warm: list[list[float]] = [[], []]
    for _ in range(args.repeats):
        for session, times in zip(sessions, warm):
            t0 = time.perf_counter()
            session.execute("topk 20 act_times_grad")
            times.append(time.perf_counter() - t0)
    info = sessions[0].info()
    for session in sessions:
        session.close()
    return [(first, times, info) for first, times in zip(firsts, warm)]


# --- plot ----------------------------------------------------------------------------------------------

CONTENDER_ORDER = ["floor", "tdbql", "tdbql_compiled", "tl", "tl_all"]


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, models = [], set()
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "summary" not in report:
            continue
        rows += [(report["environment"]["device"], s) for s in report["summary"]]
        models.add(report["model"]["shape"])
    order = [name for name in CONTENDER_ORDER if any(name in s["median_s"] for _, s in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{dev} {s['dtype']}\n{s['workload']} {s['shape']}" for dev, s in rows]
    width = 0.8 / len(order)
    for i, name in enumerate(order):
        xs = [j + i * width for j in range(len(rows))]
        times = [s["median_s"].get(name, float("nan")) * 1000 for _, s in rows]
        peaks = [s["peak_mib"].get(name, float("nan")) for _, s in rows]
        axes[0].bar(xs, times, width, label=name)
        axes[1].bar(xs, peaks, width, label=name)
    for ax, title in zip(axes, ("median time (ms, log)", "peak memory above baseline (MiB, log)")):
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"topk 20 act_times_grad, random {', '.join(sorted(models))} model (lower is better)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def markdown(paths: list[str]) -> str:
    """A results table (one row per dtype, workload, contender) for docs/performance.md."""
    lines = ["| device | dtype | workload | contender | median (min) | peak memory | tokens/s | same top-k as floor |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "summary" not in report:  # embedded-model and hand-made re-check files
            continue
        device = report["environment"]["device"]
        for s in report.get("summary", []):
            agreement = s.get("agreement_with_floor", {})
            for name in CONTENDER_ORDER:
                if name not in s["median_s"]:
                    if name in s["errors"]:
                        lines.append(f"| {device} | {s['dtype']} | {s['workload']} | {name} | error | | | |")
                    continue
                same = "reference" if name == "floor" else (
                    "yes" if agreement[name]["equal"] else f"no ({len(agreement[name]['missing'])} differ)")
                lines.append(f"| {device} | {s['dtype']} | {s['workload']} {s['shape']} | {name} | "
                             f"{_ms(s['median_s'][name])} ({_ms(_min_s(report, s, name))}) | "
                             f"{s['peak_mib'][name]:.0f} MiB | "
                             f"{s['tokens_per_s'][name]:,.0f} | {same} |")
    return "\n".join(lines)


def _min_s(report: dict, summary: dict, name: str) -> float:
    runs = [r for r in report["runs"] if r.get("contender") == name and r.get("dtype") == summary["dtype"]
            and r.get("workload") == summary["workload"] and "times_s" in r]
    return min(runs[0]["times_s"])


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


# --- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="bench", help="results go to bench/results/NAME.json")
    p.add_argument("--model", default="gpt2-small", choices=sorted(C.MODEL_SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--workloads", type=lambda s: s.split(","), default=["W1", "W2", "W3", "W4"])
    p.add_argument("--contenders", type=lambda s: s.split(","), default=["floor", "tl", "tdbql"])
    p.add_argument("--shape", action="append", default=[], metavar="W=NxT",
                   help="workload shape override, e.g. W2=8x128 or W4=1000x16-64 (worker: NxT)")
    p.add_argument("--batch-size", action="append", default=[], metavar="W=N")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--data", default=str(C.DATA), help="where random checkpoints are cached")
    p.add_argument("--note", default="", help="free text stored in the results (e.g. CPU contention)")
    p.add_argument("--strict", action="store_true", help="exit 1 if contenders disagree in fp32")
    p.add_argument("--in-process", action="store_true", help="no subprocess per contender (tests; memory is shared)")
    p.add_argument("--out", help="output path (default bench/results/NAME.json; with --plot the PNG)")
    p.add_argument("--embedded", action="store_true", help="cold start and warm query of the embedded model")
    p.add_argument("--embedded-model", default="default", help="model for --embedded (default: the shipped one)")
    p.add_argument("--plot", nargs="+", metavar="RESULTS_JSON")
    p.add_argument("--table", nargs="+", metavar="RESULTS_JSON", help="print a markdown table of results")
    # worker mode (one subprocess per contender)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--contender", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else \
        " ".join(shlex.quote(a) for a in ["bench/harness.py", *argv])
    _per_workload(args)
    return args


def _per_workload(args) -> None:
    if args.worker:  # --shape NxT, --batch-size N
        args.shape = args.shape[0] if args.shape else None
        args.batch_size = int(args.batch_size[0]) if args.batch_size else None
        return
    shapes = dict(item.split("=", 1) for item in args.shape)
    sizes = {k: int(v) for k, v in (item.split("=", 1) for item in args.batch_size)}
    args.shape_for = shapes.get
    args.batch_for = sizes.get
    # W4 is one long pass over the prompt set: time it once.
    args.repeats_for = lambda w: 1 if w == "W4" else args.repeats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0
    if args.table:
        print(markdown(args.table))
        return 0
    if args.plot:
        plot(args.plot, args.out or str(C.REPO / "docs" / "performance.png"))
        return 0
    out = Path(args.out) if args.out else RESULTS / f"{args.name}.json"
    if args.embedded:
        report = {"name": args.name, "command": args.command, "environment": environment("cpu"),
                  "notes": args.note, "embedded": embedded(args)}
    else:
        report = bench(args, out)
    _write(out, report)
    print(f"wrote {out}", file=sys.stderr)
    failed = any(s.get("strict_failure") for s in report.get("summary", []))
    errors = any("error" in r for r in report.get("runs", [])) or "error" in report.get("embedded", {})
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
