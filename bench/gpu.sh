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
# Extra arguments go to `python -m bench.gpu` (see `python -m bench.gpu --help`).
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

echo "== benchmark (budget ${BUDGET_S} s, stopped at ${HARD_LIMIT_S} s)"
timeout --signal=INT --kill-after=15 "$HARD_LIMIT_S" \
    "$PYTHON" -m bench.gpu --out "$OUT_DIR" --budget-s "$BUDGET_S" --fixed-gamma "$FIXED_GAMMA" "$@" \
    2>&1 | tee "$OUT_DIR/gpu_log.txt"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    echo "== stopped (exit $status); the table of what was measured:"
    "$PYTHON" -c "import json, sys; from bench.gpu import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$OUT_DIR/gpu_results.json" || true
fi
exit "$status"
