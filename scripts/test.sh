#!/usr/bin/env bash
# Set up, then run every check CI runs: lint, types, proto lint and freshness, all tests
# (including the slow end-to-end checks on the real default pair; the first run fetches it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
set -x
ruff check decoding service bench tests protos/generate.py
mypy decoding service bench
(cd protos && buf lint)
python protos/generate.py --check
python -m pytest -q --durations=15 "$@"
