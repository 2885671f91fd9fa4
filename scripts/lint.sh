#!/usr/bin/env bash
# Set up (if needed), then lint, check the formatting and type-check, as CI does before the tests.
# Every check runs; the exit status is non-zero when any of them failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PATHS=(fv_compile tests benchmarks scripts)
failed=0
.venv/bin/ruff check "${PATHS[@]}" || failed=1
.venv/bin/ruff format --check "${PATHS[@]}" || failed=1
.venv/bin/mypy || failed=1  # the files of [tool.mypy] in pyproject.toml: the package
exit "$failed"
