#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Without CUDA, tests/conftest.py runs the
# Triton kernels in Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
