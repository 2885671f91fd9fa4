"""The backends' kernels: our Triton flash-attention, 8-bit and block-sparse forwards, and the
adapters to flash-attn-4's block-sparse forward.

What the kernels can run is written here, once, importable without Triton or flash-attn (the
backends declare it as their capabilities before any kernel loads), and so is the one reading of
`TRITON_INTERPRET` in the package.
"""

import os


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (`TRITON_INTERPRET=1`), which runs them on
    the CPU too. Read at each call: Triton itself reads the variable when a kernel is defined, so
    whoever sets it (tests/conftest.py for the tests) sets it before the kernels are imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_HEAD_DIMS = (64, 128)  # flash_fwd.py and block_sparse_fwd.py compile for these head dims
FA4_SPARSE_HEAD_DIMS = (64, 128)  # what fa4_block_sparse.py runs through flash-attn-4
SAGE_HEAD_DIMS = (64, 128)  # what sage_fwd.py (8-bit attention) compiles for
