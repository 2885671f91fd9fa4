"""TORCH_SDPA: PyTorch's scaled_dot_product_attention, the reference backend.

Runs everywhere SDPA runs (CPU and every CUDA GPU; on the H200 it dispatches to cuDNN), and serves
every site form: masks, causal, GQA, cross-attention, any head size.
"""

from __future__ import annotations

from fv_compile.backends._dense import DenseBackend, DenseImpl, sdpa_bshd
from fv_compile.site import MASK_ADDITIVE, MASK_BOOL


class SDPAImpl(DenseImpl):
    def forward(self, query, key, value, attn_metadata):
        return sdpa_bshd(
            query,
            key,
            value,
            attn_mask=getattr(attn_metadata, "attn_mask", None),
            scale=self.scale,
            causal=self.causal,
        )


class SDPABackend(DenseBackend):
    mask_kinds = (MASK_BOOL, MASK_ADDITIVE)
    causal_cross = True
    value_head_dim_differs = True
    needs_head_groups = False
    differentiable = True

    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA"

    @staticmethod
    def get_impl_cls() -> type[SDPAImpl]:
        return SDPAImpl
