#!/usr/bin/env bash
# Create .venv with the CPU build of torch pinned, and fv_compile with its test and report extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: anything that asks for a newer torch must not pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q "triton" -e ".[test,report]" "torch==2.13.0"
