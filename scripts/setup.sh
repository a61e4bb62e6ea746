#!/usr/bin/env bash
# Create .venv and install Tandem into it. Works on a fresh machine with Python 3.11 and pip.
# torch goes first and pinned: this is the CPU build; a bare `torch` requirement would pull a
# multi-GB CUDA build. On a GPU machine install your CUDA build of torch first instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[${TANDEM_EXTRAS:-dev}]"
