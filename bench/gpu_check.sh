#!/usr/bin/env bash
# The whole GPU check in one call (docs/performance.md, "Running the GPU check"):
#   (a) install only what the machine lacks: the wheels in .whl/ (bench/build_wheels.sh makes
#       them here; carry .whl) and tdbql itself with --no-deps, so the machine's torch stays;
#   (b) the GPU tests, `pytest -m gpu` (CUDA against CPU fp32, bf16, ablation, patching, tracing,
#       routes at 1,024 tokens, the compiled path);
#   (c) the harness, one workload at a time, each under a time cap;
#   (d) every result and log under $OUT (a temporary folder when $OUT is unset).
# `--rehearse` runs the same steps on the CPU at tiny sizes and fp32, installing nothing, every
# contender on W2 and the floor and tdbql on the others (CI runs it: tests/bench/test_gpu_check.py).
# The script goes on after a failed step and exits 1 at the end if any step failed; the summary
# says which.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
FAILED=()
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
step() {  # step NAME SECONDS COMMAND...: run under a time cap, log to $OUT/NAME.log
    local name=$1 cap=$2
    shift 2
    log "start $name (cap ${cap}s)"
    if timeout --signal=INT --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1; then
        log "ok $name"
    else
        log "FAILED $name (exit $?): see $name.log"
        FAILED+=("$name")
    fi
}

if [ "$REHEARSE" = 1 ]; then
    DEVICE=cpu
    export TDBQL_GPU_REHEARSE=1
    HARNESS_ARGS=(--model tiny --shape W1=1x16 --shape W2=4x16 --shape W3=2x32 --shape W4=16x8-16
                  --repeats 1 --warmup 0 --in-process)
    DTYPES=fp32 CAP_TESTS=600 CAP_WORKLOAD=120
else
    DEVICE=cuda
    HARNESS_ARGS=(--model gpt2-small --repeats 5 --warmup 1)
    DTYPES=fp32,bf16 CAP_TESTS=240 CAP_WORKLOAD=75
    if ls .whl/*.whl >/dev/null 2>&1; then
        step install_wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        log "no wheels in .whl/ (run bench/build_wheels.sh here and carry .whl): using what is installed"
    fi
    step install_tdbql 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi

"$PY" - >"$OUT/environment.json" 2>>"$OUT/gpu_check.log" <<'PYTHON'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
for name in ("transformers", "duckdb", "lark", "transformer_lens", "tdbql.executor.engine"):
    try:
        module = __import__(name, fromlist=["_"])
        info[name] = getattr(module, "__version__", "importable")
    except Exception as error:  # noqa: BLE001 - recorded, the steps below adapt
        info[name] = f"not importable: {type(error).__name__}: {error}"
print(json.dumps(info, indent=2))
PYTHON
log "environment: $(tr -d '\n' <"$OUT/environment.json")"

step gpu_tests "$CAP_TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/executor/test_gpu.py \
    tests/executor/runtime/test_loading.py --junitxml="$OUT/gpu_tests.xml"

CONTENDERS=floor,tdbql,tdbql_compiled
if "$PY" -c "import transformer_lens" 2>/dev/null; then
    CONTENDERS=floor,tl,tdbql,tdbql_compiled
else
    log "transformer_lens is not importable: the harness runs without the tl contender"
fi
for workload in W1 W2 W3 W4; do
    contenders=$CONTENDERS
    # the rehearsal runs every contender once (on W2) and the cheap ones elsewhere, to stay short
    [ "$REHEARSE" = 1 ] && [ "$workload" != W2 ] && contenders=floor,tdbql
    step "harness_$workload" "$CAP_WORKLOAD" "$PY" bench/harness.py --device "$DEVICE" --dtypes "$DTYPES" \
        --workloads "$workload" --contenders "$contenders" --strict --name "gpu-$workload" \
        --out "$OUT/harness_$workload.json" "${HARNESS_ARGS[@]}"
done

if [ ${#FAILED[@]} -eq 0 ]; then
    log "summary: every step passed; results in $OUT"
    exit 0
fi
log "summary: failed steps: ${FAILED[*]}; results and logs in $OUT"
exit 1
