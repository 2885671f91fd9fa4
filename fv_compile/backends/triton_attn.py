"""TRITON_ATTN: our Triton flash-attention forward, reading and writing `[B, S, H, D]` directly.

The portable fast path, and the base of the block-sparse kernels. Head dims 64 and 128, bf16/fp16
(fp32 for tests), causal (top-left, as SDPA), GQA, cross-attention. Sites with an attention mask go
to a dense fallback. On the CPU it runs only under the Triton interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

from typing import Any

from fv_compile.backends._checks import common_limits, interpreting
from fv_compile.backends._dense import DenseBackend, DenseImpl
from fv_compile.site import AttentionSite


class TritonAttentionImpl(DenseImpl):
    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, *args: Any, **kw: Any):
        from fv_compile.backends.kernels.flash_fwd import SUPPORTED_HEAD_DIMS

        if head_size not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"TRITON_ATTN supports head dims {SUPPORTED_HEAD_DIMS}, got {head_size}")
        super().__init__(num_heads, head_size, softmax_scale, *args, **kw)

    def forward(self, query, key, value, attn_metadata):
        from fv_compile.backends.kernels.flash_fwd import attention_fwd

        if getattr(attn_metadata, "attn_mask", None) is not None:
            raise ValueError("TRITON_ATTN does not take an attention mask")
        return attention_fwd(query, key, value, softmax_scale=self.scale, causal=self.causal)


class TritonAttentionBackend(DenseBackend):
    @staticmethod
    def get_name() -> str:
        return "TRITON_ATTN"

    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return TritonAttentionImpl

    @staticmethod
    def get_supported_head_sizes() -> list[int]:
        return [64, 128]

    @staticmethod
    def supports(site: AttentionSite) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        return common_limits(
            site,
            head_dims=(64, 128),
            dtypes=("bfloat16", "float16", "float32"),
            cpu_ok=interpreting(),
            masks=False,
            causal_cross=True,
        )
