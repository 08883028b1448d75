#!/usr/bin/env bash
# Every GPU check in one call, for a CUDA machine without network access (in the project's
# runs: one H200, torch 2.11, triton 3.6, no open_clip): build the extension, run the GPU
# tests, then the GPU benchmarks, and write everything into one folder, within a time budget.
#
#   benchmarks/gpu_suite.sh [OUTPUT_FOLDER]    (default: benchmarks/results/gpu-<UTC time>)
#
# The folder gets at most 8 files (what a device call brings back): suite.log (every step's
# output), summary.json (the machine, and each step's exit status and seconds),
# gpu_tests.xml, decode_gpu.json (how far nvjpeg's decode is from PIL's:
# decode_difference.py), models_gpu.json and kernels_gpu.json (pytest-benchmark), and
# performance_gpu.md and .png (render_results.py).
#
# Environment:
#   PYTHON                     the interpreter (default: python3)
#   FASTCLIP_SUITE_BUDGET_S    seconds for the whole suite (default 480: 8 minutes); each
#                              step is stopped when its share runs out, and the steps before
#                              the kernel micro-benchmarks and the render leave them their time
#   FASTCLIP_SUITE_DRY_RUN=1   the same steps on the CPU in seconds: no build, the GPU tests
#                              only collected, the benchmarks at --bench-sizes=tiny. CI runs
#                              it so (tests/test_benchmarks_dry_run.py).
# The packages the GPU machine lacks (ftfy, wcwidth, open_clip) are installed from the wheels
# in benchmarks/wheels/, which benchmarks/fetch_gpu_wheels.sh downloads on a machine with a
# registry (the folder is not committed; carry it). After the build, a check step stops the
# suite unless fastclip._C has its CUDA part and the Triton backend runs: results are never
# labelled fastclip when they are not.
set -uo pipefail  # not -e: a failed step is recorded and the next steps still run

cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
PYTHON=${PYTHON:-python3}
DRY_RUN=${FASTCLIP_SUITE_DRY_RUN:-0}
BUDGET=${FASTCLIP_SUITE_BUDGET_S:-480}
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/suite.log"
STEPS="$OUT/steps.tsv"  # name, exit status, seconds; folded into summary.json at the end
: >"$LOG"
: >"$STEPS"

# run_step NAME SHARE RESERVE COMMAND...: run COMMAND with at most SHARE seconds, never past
# the budget less RESERVE (the time the later steps are guaranteed); its output goes to
# suite.log. SIGINT first, so that pytest still writes its JSON.
run_step() {
    local name=$1 share=$2 reserve=$3
    shift 3
    local left=$((BUDGET - ($(date +%s) - START) - reserve))
    local limit=$((share < left ? share : left))
    local begin=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    if ((limit <= 0)); then
        echo "skipped: the budget of ${BUDGET}s is spent" >>"$LOG"
        printf '%s\t%s\t%s\n' "$name" "skipped" 0 >>"$STEPS"
        return
    fi
    timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1
    local status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" $(($(date +%s) - begin)) >>"$STEPS"
    echo "=== $name: exit $status after $(($(date +%s) - begin))s" >>"$LOG"
}

KERNELS_S=60 RENDER_S=20  # guaranteed: the steps before them leave them this much
WHEELS=(benchmarks/wheels/*.whl)
if [[ $DRY_RUN == 1 ]]; then
    SIZES=tiny
    run_step wheels 5 0 echo "dry run: skipped" \
        "$PYTHON -m pip install --no-index --no-deps ${WHEELS[*]}"
    run_step build 5 0 echo "dry run: skipped" \
        "$PYTHON -m pip install --no-build-isolation --no-deps -e ."
    run_step check 60 0 "$PYTHON" benchmarks/check_install.py --dry-run
else
    SIZES=gpu
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [[ -e ${WHEELS[0]} ]]; then
        run_step wheels 60 0 "$PYTHON" -m pip install --no-index --no-deps "${WHEELS[@]}"
    fi
    run_step build 150 0 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
    run_step check 60 0 "$PYTHON" benchmarks/check_install.py
fi
if [[ $(tail -n 1 "$STEPS" | cut -f2) != 0 ]]; then
    # fastclip did not install with its CUDA part and Triton: nothing below would measure it.
    "$PYTHON" benchmarks/machine.py --steps "$STEPS" --sizes "$SIZES" >"$OUT/summary.json"
    rm -f "$STEPS"
    echo "stopped: the check failed (see $LOG)" | tee -a "$LOG" >&2
    exit 1
fi
if [[ $DRY_RUN == 1 ]]; then
    run_step gpu_tests 120 $((KERNELS_S + RENDER_S)) "$PYTHON" -m pytest -m gpu tests -q \
        -p no:cacheprovider --collect-only
else
    run_step gpu_tests 120 $((KERNELS_S + RENDER_S)) "$PYTHON" -m pytest -m gpu tests -q \
        -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
fi
if [[ $DRY_RUN == 1 ]]; then
    run_step decode 30 $((KERNELS_S + RENDER_S)) "$PYTHON" benchmarks/decode_difference.py \
        --device cpu --images 1 --output "$OUT/decode_gpu.json"
else
    run_step decode 30 $((KERNELS_S + RENDER_S)) "$PYTHON" benchmarks/decode_difference.py \
        --device cuda --output "$OUT/decode_gpu.json"
fi
run_step kernels $KERNELS_S $RENDER_S "$PYTHON" -m pytest benchmarks/bench_kernels.py -q \
    -p no:cacheprovider --benchmark-json="$OUT/kernels_gpu.json"
run_step models 240 $RENDER_S "$PYTHON" -m pytest benchmarks/bench_models.py -q \
    -p no:cacheprovider --bench-sizes=$SIZES --benchmark-json="$OUT/models_gpu.json"
run_step render $RENDER_S 0 "$PYTHON" benchmarks/render_results.py "$OUT/models_gpu.json" \
    --output "$OUT/performance_gpu"

# summary.json; machine.py exits 1 when a step that ran failed, and so does the suite.
"$PYTHON" benchmarks/machine.py --steps "$STEPS" --sizes "$SIZES" >"$OUT/summary.json"
status=$?
rm -f "$STEPS"
echo "wrote $OUT in $(($(date +%s) - START))s"
exit $status
