"""TRITON_ATTN: our Triton flash-attention forward, reading and writing `[B, S, H, D]` directly.

The portable fast path, and the base of the block-sparse kernels. Head dims 64 and 128, bf16/fp16
(fp32 for tests), causal (top-left, as SDPA), GQA, cross-attention. Sites with an attention mask go
to a dense fallback. On the CPU it runs only under the Triton interpreter (`TRITON_INTERPRET=1`).
The kernel (`kernels/flash_fwd.py`) imports Triton, so it loads on the first call, and a missing
Triton is a fallback reason instead of an import error.
"""

from __future__ import annotations

import importlib
from typing import Any

from fv_compile.backends._checks import interpreting
from fv_compile.backends._dense import DenseBackend, DenseImpl
from fv_compile.backends.kernels import TRITON_HEAD_DIMS
from fv_compile.site import AttentionSite


class TritonAttentionImpl(DenseImpl):
    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, *args: Any, **kw: Any):
        if head_size not in TRITON_HEAD_DIMS:
            raise ValueError(f"TRITON_ATTN supports head dims {TRITON_HEAD_DIMS}, got {head_size}")
        super().__init__(num_heads, head_size, softmax_scale, *args, **kw)

    def forward(self, query, key, value, attn_metadata):
        from fv_compile.backends.kernels.flash_fwd import attention_fwd  # imports triton

        if getattr(attn_metadata, "attn_mask", None) is not None:
            raise ValueError("TRITON_ATTN does not take an attention mask")
        return attention_fwd(query, key, value, softmax_scale=self.scale, causal=self.causal)


class TritonAttentionBackend(DenseBackend):
    head_sizes = TRITON_HEAD_DIMS
    dtypes = ("bfloat16", "float16", "float32")
    causal_cross = True  # top-left aligned, as SDPA
    differentiable = True

    @staticmethod
    def get_name() -> str:
        return "TRITON_ATTN"

    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return TritonAttentionImpl

    @staticmethod
    def supports(site: AttentionSite) -> str | None:
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed (pip install triton)"
        if not site.device.startswith("cuda") and not interpreting():
            return f"device {site.device} (needs CUDA)"
        return None
