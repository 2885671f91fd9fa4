"""The backends' kernels: our Triton flash-attention and block-sparse forwards, and the adapters
to flash-attn-4's block-sparse forward.

What the kernels can run is written here, once, importable without Triton or flash-attn (the
backends declare it as their capabilities before any kernel loads).
"""

TRITON_HEAD_DIMS = (64, 128)  # flash_fwd.py and block_sparse_fwd.py compile for these head dims
FA4_SPARSE_HEAD_DIMS = (64, 128)  # what fa4_block_sparse.py runs through flash-attn-4
