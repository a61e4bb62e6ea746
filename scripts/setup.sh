#!/usr/bin/env bash
# Create .venv and install Tandem into it. Works on a fresh machine with Python 3.11 and pip.
# torch goes first and pinned, so that a bare `torch` requirement does not pull the newest
# build. Where pip finds its CPU wheel locally (this project's machines) that is what it gets;
# from PyPI, on Linux x86_64, torch==2.13.0 is the multi-GB CUDA build: for the CPU build there,
# set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. On a GPU machine install your CUDA
# build of torch into .venv first: a torch already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null ||
    python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install --quiet -e ".[${TANDEM_EXTRAS:-dev}]"
