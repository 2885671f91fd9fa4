#!/usr/bin/env bash
# Create .venv with the CPU build of torch pinned, fv_compile with its test and report extras,
# and the linters scripts/lint.sh runs, pinned so that every checkout lints alike.
#
# Quiet: pip's output goes to .venv/setup.log and is shown only when a step fails. Fast when
# nothing changed: .venv/.setup-stamp holds a hash of pyproject.toml, this script (the pins live
# here) and the venv's Python; when it matches and fv_compile is installed, pip is not run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=torch==2.13.0
LINTERS=(ruff==0.17.6 mypy==2.4.1)
STAMP=.venv/.setup-stamp
LOG=.venv/setup.log

stamp() {
  { cat pyproject.toml scripts/setup.sh; .venv/bin/python -c 'import sys; print(sys.version)'; } \
    | sha256sum | cut -d' ' -f1
}

installed() {  # fv_compile importable from the venv (find_spec: no torch import, milliseconds)
  .venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("fv_compile") is None)' \
    >/dev/null 2>&1
}

if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp)" ] && installed; then
  exit 0
fi

step() {  # run a setup step with its output in the log; on failure show the log and stop
  if ! "$@" >>"$LOG" 2>&1; then
    echo "scripts/setup.sh: failed: $*" >&2
    echo "--- last lines of $LOG ---" >&2
    tail -n 60 "$LOG" >&2
    exit 1
  fi
}

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_WARN_SCRIPT_LOCATION=1
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  : >"$LOG"
  echo "scripts/setup.sh: creating .venv (pip's log: $LOG)" >&2
  step .venv/bin/python -m pip install -q --upgrade pip
else
  : >"$LOG"
  echo "scripts/setup.sh: updating .venv (pyproject.toml or the pins changed; pip's log: $LOG)" >&2
fi
rm -f "$STAMP"
# torch first and pinned: anything that asks for a newer torch must not pull a multi-GB CUDA build
step .venv/bin/python -m pip install -q "$TORCH"
step .venv/bin/python -m pip install -q "triton" -e ".[test,report]" "$TORCH" "${LINTERS[@]}"
stamp >"$STAMP"
