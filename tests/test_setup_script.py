"""scripts/setup.sh: quiet, a no-op when nothing changed, loud when pip fails.

Runs a copy of the script in a scratch checkout with a fake Python (it logs what it is asked to do
and makes a fake venv), so nothing is installed or downloaded."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
# fake python: `-m venv DIR` makes DIR/bin/python (this script); `-m pip ...` is logged and fails
# when FAKE_PIP_FAILS is set; `-c CODE` prints a version line and succeeds.
echo "$*" >> "$FAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && chmod +x "$3/bin/python"
elif [ "$1 $2" = "-m pip" ]; then
  echo "WARNING: a pip banner that must not reach the terminal"
  if [ -n "${FAKE_PIP_FAILS:-}" ]; then echo "ERROR: No matching distribution found for torch"; exit 1; fi
else
  echo "3.11.7 (fake)"
fi
"""


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "fv-compile"\n')
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return tmp_path


def _setup(checkout, **env):
    log = checkout / "calls.log"
    log.write_text("")
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=checkout,
        env={**os.environ, "PYTHON": str(checkout / "fake-python"), "FAKE_LOG": str(log), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    pip_calls = [line for line in log.read_text().splitlines() if line.startswith("-m pip")]
    return done, pip_calls, time.perf_counter() - start


def test_setup_on_a_fresh_clone_installs_quietly(checkout):
    done, pip_calls, _ = _setup(checkout)
    assert done.returncode == 0, done.stderr
    assert any("torch==" in c for c in pip_calls) and any(
        "-e .[test,report]" in c for c in pip_calls
    )
    assert done.stdout == ""
    assert "WARNING" not in done.stderr and len(done.stderr.splitlines()) == 1  # one status line
    assert (checkout / ".venv" / ".setup-stamp").exists()


def test_setup_does_nothing_and_says_nothing_when_nothing_changed(checkout):
    assert _setup(checkout)[0].returncode == 0
    done, pip_calls, seconds = _setup(checkout)
    assert done.returncode == 0
    assert pip_calls == []
    assert done.stdout == "" and done.stderr == ""
    assert seconds < 5


def test_setup_reinstalls_when_pyproject_changes(checkout):
    assert _setup(checkout)[0].returncode == 0
    with open(checkout / "pyproject.toml", "a") as f:
        f.write('dependencies = ["torch>=2.11"]\n')
    done, pip_calls, _ = _setup(checkout)
    assert done.returncode == 0
    assert any("-e .[test,report]" in c for c in pip_calls)


def test_setup_shows_pips_error_and_fails_when_pip_fails(checkout):
    done, _, _ = _setup(checkout, FAKE_PIP_FAILS="1")
    assert done.returncode != 0
    assert "No matching distribution found for torch" in done.stderr
    assert not (checkout / ".venv" / ".setup-stamp").exists()  # the next run tries again
