#!/usr/bin/env bash
# The GPU benchmark, prepared to run as one command on a GPU machine with no network:
#
#     bash bench/gpu.sh                 # results into $OUT, else bench/out/gpu
#     OUT=/tmp/res bash bench/gpu.sh --targets 7b --fixed-gamma 0
#
# It needs only what that machine has (python with torch, transformers, numpy; matplotlib is
# optional: without it no PNGs are drawn) and this repository's own code; it installs nothing
# and downloads nothing (the models are random-weight Qwen2.5 shapes built on the device, see
# bench/gpu.py). It prints the GPU first, then the benchmark's progress, then a short table.
#
# Time: the benchmark starts no new section after BENCH_GPU_BUDGET_S seconds (default 330) and
# is stopped at BENCH_GPU_HARD_LIMIT_S (default budget + 120). The JSON is rewritten after every
# section, so whatever was measured before a stop is kept, and its table printed.
# Extra arguments go to `python -m bench.gpu` (see `python -m bench.gpu --help`), except
# --budget-s (refused: use BENCH_GPU_BUDGET_S, which the hard stop follows). Without CUDA it
# refuses to start unless given --quick or --device. An earlier run's JSON in the results
# folder is removed first, and the JSON is replaced whole after each section ("complete": true
# once every section ran).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/out/gpu}"
BUDGET_S="${BENCH_GPU_BUDGET_S:-330}"
HARD_LIMIT_S="${BENCH_GPU_HARD_LIMIT_S:-$((${BUDGET_S%.*} + 120))}"
FIXED_GAMMA="${BENCH_GPU_FIXED_GAMMA:-0}"
mkdir -p "$OUT_DIR"

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory \
        --format=csv || true
    nvidia-smi || true
else
    echo "nvidia-smi not found"
fi

echo "== software"
"$PYTHON" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "numpy", "matplotlib", "grpc"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError:
        print(f"{name}: not installed")
import torch
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available())
import bench.gpu, decoding.engine  # noqa: F401  (fails here, not mid-run, if anything is missing)
EOF
[ $? -eq 0 ] || { echo "the benchmark's imports failed (see above)"; exit 1; }

explicit_device=0
for arg in "$@"; do
    case "$arg" in
        --budget-s|--budget-s=*)
            echo "set the budget with BENCH_GPU_BUDGET_S (the hard stop follows it), not --budget-s"
            exit 2 ;;
        --quick|--device|--device=*) explicit_device=1 ;;
    esac
done
# Without CUDA, auto would pick the CPU and spend the whole budget on CPU numbers at GPU
# shapes: only --quick (tiny shapes) or an explicit --device runs there.
if [ "$explicit_device" -eq 0 ]; then
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "CUDA is not available here: pass --quick or --device to run anyway"
        exit 1
    }
fi
# A result file of an earlier run must not pass for this run's if this one stops early.
rm -f "$OUT_DIR/gpu_results.json"

echo "== benchmark (budget ${BUDGET_S} s, stopped at ${HARD_LIMIT_S} s)"
timeout --signal=INT --kill-after=15 "$HARD_LIMIT_S" \
    "$PYTHON" -m bench.gpu --out "$OUT_DIR" --budget-s "$BUDGET_S" --fixed-gamma "$FIXED_GAMMA" "$@" \
    2>&1 | tee "$OUT_DIR/gpu_log.txt"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    echo "== stopped (exit $status); the table of what was measured:"
    [ -f "$OUT_DIR/gpu_results.json" ] || { echo "(nothing: the run stopped before its first section)"; exit "$status"; }
    "$PYTHON" -c "import json, sys; from bench.gpu import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$OUT_DIR/gpu_results.json" || true
fi
exit "$status"
