"""TORCH_SDPA: PyTorch's scaled_dot_product_attention, the reference backend.

Runs everywhere SDPA runs (CPU and every CUDA GPU; on the H200 it dispatches to cuDNN), and serves
every site form: masks, causal, GQA, cross-attention, any head size.
"""

from __future__ import annotations

import torch

from fv_compile.backends._dense import DenseBackend, DenseImpl, sdpa_bshd
from fv_compile.site import MASK_ADDITIVE, MASK_BOOL, AttentionSite


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


def trains_on_a_fused_kernel(site: AttentionSite) -> bool:
    """Whether SDPA's autograd runs `site` (unmasked) on a fused kernel, forward and backward:
    its backward then reuses the forward's log-sum-exp, and nothing of `[Sq, Sk]` size is kept
    in between. Where SDPA would fall back to its math kernel, autograd would keep the weights of
    every site until the backward: such sites train through the op's blocked recomputation.
    Stated conservatively, on what flash attention takes (SDPA's first fused choice) on CUDA and
    its CPU kernel on the CPU: one head count for q, k and v, one head dim for all three."""
    d = site.head_dim or 0
    same = site.heads == site.kv_heads and d == site.value_head_dim and d > 0
    if not same or (site.causal and site.q_len != site.kv_len):
        return False
    if site.device == "cpu":
        return (
            site.dtype in ("float32", "bfloat16", "float16")
            and torch.backends.cuda.flash_sdp_enabled()
        )
    if not site.device.startswith("cuda") or site.dtype not in ("float16", "bfloat16"):
        return False
    return (
        d % 8 == 0
        and d <= 256
        and torch.backends.cuda.flash_sdp_enabled()
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(torch.device(site.device))[0] >= 8
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

    @staticmethod
    def traced_in_training(site: AttentionSite) -> bool:
        """Unmasked sites SDPA trains on a fused kernel: SDPA's own backward (cuDNN's or
        flash's, as eager's) then reuses the forward's log-sum-exp. A mask keeps the op, whose
        backward gives eager's gradients on fully blocked rows."""
        return site.mask is None and trains_on_a_fused_kernel(site)
