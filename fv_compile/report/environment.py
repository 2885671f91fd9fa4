"""Where a report was measured: hardware, driver, library versions, code version, command line.

A speedup is only meaningful with these beside it, so every report carries them. Each probe is
best-effort: a missing tool (no git, no nvidia-smi) gives None, never an error.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import fv_compile


def collect_environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(argv),
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # CPU timings swing by several times when other processes compete for the cores
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "fv_compile": fv_compile.__version__,
        "git_commit": _git_commit(),
        "inductor_caches_disabled": os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1",
        "gpu": None,
        "gpu_memory_gib": None,
        "gpu_capability": None,
        "driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["driver"] = _nvidia_driver()
    return env


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(*cmd: str, cwd: Path | None = None) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_commit() -> str | None:
    """The commit of the fv_compile checkout in use, with "+dirty" for uncommitted changes to
    tracked files; None for an installed wheel. `--no-optional-locks` keeps git from writing the
    index, so a report never races a commit in progress."""
    root = Path(fv_compile.__file__).resolve().parent.parent
    commit = _run("git", "--no-optional-locks", "rev-parse", "HEAD", cwd=root)
    if not commit:
        return None
    changes = _run(
        "git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no", cwd=root
    )
    return f"{commit}+dirty" if changes else commit


def _nvidia_driver() -> str | None:
    out = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return out.splitlines()[0].strip() if out else None
