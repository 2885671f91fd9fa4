import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Inductor's caches stay on, as users have them (a forced off also turns off Dynamo's profile-
# guided dynamic shapes in the processes that see it at import: pytest-xdist's workers), in a
# folder of this run's own, which the workers inherit: no entry from another checkout or run.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fv-compile-tests-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
if not torch.cuda.is_available():
    # The one place the tests turn on Triton's interpreter, so that the kernels run on the CPU;
    # a machine with CUDA runs them for real. Triton reads it when an @triton.jit function is
    # defined: pytest loads this file before any test module imports a kernel module.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cached frames, no recompile limit carried over."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
