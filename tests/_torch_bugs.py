"""Skips for bugs of torch itself that a test would otherwise report as fv_compile's."""

import pytest
import torch

# torch < 2.13, CPU Inductor: the C++ code of an index_select fused under a mask (the tile-order
# gathers of the RoPE tables, inside a split) builds an at::vec::VecMask from a bool and does not
# compile. A loud compile error, never a wrong number; torch 2.13 compiles the same graph. CUDA
# (Triton code) is not affected.
inductor_cpu_masked_gather = pytest.mark.skipif(
    torch.__version__ < "2.13",
    reason="torch < 2.13: Inductor's C++ code for an index_select fused under a mask does not "
    "compile (at::vec::VecMask built from a bool); torch 2.13 compiles the same graph",
)
