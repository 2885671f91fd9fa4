import os

import pytest
import torch

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be on before any
    # @triton.jit function is defined, i.e. before the first kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cached frames, no recompile limit carried over."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
