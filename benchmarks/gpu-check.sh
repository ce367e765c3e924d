#!/usr/bin/env bash
# GPU check (issue 14): on a CUDA machine
#   1. installs this checkout (pip install -e ".[test]"),
#   2. runs the test suite with DFKT_TEST_DEVICE=cuda (runs with device 'auto' train on the GPU),
#   3. runs `dfkt demo` on CUDA (AMP: bf16 autocast, the default train.amp),
#   4. measures samples/s of a SHOT step on ResNet-50 at 224x224 and of DAFL synthesis + KD for
#      ResNet-34 -> ResNet-18 at 32x32 on random data (python -m dfkt.bench.gpucheck),
# and writes $OUT/gpu-check.json and $OUT/gpu-check.md (a section for benchmarks/RESULTS.md; with
# GPU_CHECK_PUBLISH=1 it is written there). Without CUDA it says so, runs the CPU dry path of the
# throughput code (tiny batches, 2 steps) and exits 0.
#
#   benchmarks/gpu-check.sh [extra args for dfkt.bench.gpucheck, e.g. --batch-shot 128 --steps 50]
#
# Environment: PYTHON (default python3), GPU_CHECK_OUT (default bench-out/gpu-check),
# GPU_CHECK_SKIP_INSTALL=1, GPU_CHECK_SKIP_TESTS=1, GPU_CHECK_SKIP_DEMO=1 (skip those stages),
# GPU_CHECK_PUBLISH=1 (update benchmarks/RESULTS.md), GPU_CHECK_PYTEST_ARGS (extra pytest arguments, e.g.
# "-n 8" with pytest-xdist on a many-core GPU machine), GPU_CHECK_TESTS_TIMEOUT (seconds; the suite is
# stopped after that and counted as failed, so the throughput figures still come out of a short lease).
# A machine with no network: GPU_CHECK_SKIP_INSTALL=1 with PYTHONPATH pointing at this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-bench-out/gpu-check}
mkdir -p "$OUT"
rm -f "$OUT"/tests.rc "$OUT"/tests.log "$OUT"/demo.rc "$OUT"/demo.log

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA: torch.cuda.is_available() is False on this machine, so nothing can be checked on a GPU."
    echo "gpu-check: running the CPU dry path of the throughput code instead (tiny batches, 2 steps; not a measurement)."
    "$PY" -m dfkt.bench.gpucheck --dry --out "$OUT" || { echo "gpu-check: the CPU dry path FAILED" >&2; exit 1; }
    echo "gpu-check: CPU dry path ok; run this script on a CUDA machine for the GPU figures."
    exit 0
fi

echo "gpu-check: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)')"
if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
    echo "gpu-check: [1/4] pip install -e .[test]"
    "$PY" -m pip install -q -e ".[test]" || { echo "gpu-check: install FAILED" >&2; exit 1; }
fi
if [ -z "${GPU_CHECK_SKIP_TESTS:-}" ]; then
    echo "gpu-check: [2/4] test suite with DFKT_TEST_DEVICE=cuda (log: $OUT/tests.log)"
    # shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a word list on purpose
    DFKT_TEST_DEVICE=cuda timeout "${GPU_CHECK_TESTS_TIMEOUT:-0}" "$PY" -m pytest -q -p no:cacheprovider \
        ${GPU_CHECK_PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1
    rc=$?
    [ "$rc" = 124 ] && echo "gpu-check: the test suite was stopped after ${GPU_CHECK_TESTS_TIMEOUT}s (GPU_CHECK_TESTS_TIMEOUT)" >> "$OUT/tests.log"
    echo "$rc" > "$OUT/tests.rc"
    tail -n 3 "$OUT/tests.log"
fi
if [ -z "${GPU_CHECK_SKIP_DEMO:-}" ]; then
    echo "gpu-check: [3/4] dfkt demo --device cuda (AMP; log: $OUT/demo.log)"
    "$PY" -m dfkt demo --device cuda --out "$OUT/demo" --no-progress > "$OUT/demo.log" 2>&1
    echo $? > "$OUT/demo.rc"
    tail -n 5 "$OUT/demo.log"
fi
echo "gpu-check: [4/4] throughput"
publish=()
[ -n "${GPU_CHECK_PUBLISH:-}" ] && publish=(--publish)
"$PY" -m dfkt.bench.gpucheck --out "$OUT" --command "benchmarks/gpu-check.sh $*" "${publish[@]}" "$@"
rc=$?
for stage in tests demo; do
    if [ -f "$OUT/$stage.rc" ] && [ "$(cat "$OUT/$stage.rc")" != 0 ]; then
        echo "gpu-check: $stage FAILED (see $OUT/$stage.log)" >&2
        rc=1
    fi
done
echo "gpu-check: results in $OUT/gpu-check.json and $OUT/gpu-check.md"
exit $rc
