#!/usr/bin/env bash
# Set up (if needed) and run the speedup report on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fv-compile report "$@"
