"""What the dense backends share: an impl that keeps the site's static facts, a backend with no
per-step metadata (FastVideo's dense backends have no builder either), and dense attention on
`[B, S, H, D]` tensors through SDPA: TORCH_SDPA's kernel, and what a sparse backend built without
a dense fallback runs its dense steps on."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fv_compile.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    SiteMetadata,
)


class DenseImpl(AttentionImpl[AttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        softmax_scale: float,
        causal: bool = False,
        num_kv_heads: int | None = None,
        prefix: str = "",
        **extra_impl_args: Any,
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_size = head_size
        self.scale = softmax_scale
        self.causal = causal
        self.prefix = prefix


class DenseBackend(AttentionBackend):
    @staticmethod
    def get_metadata_cls() -> type[SiteMetadata]:
        return SiteMetadata

    @staticmethod
    def get_builder_cls() -> None:
        return None


def sdpa_bshd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Attention on `[B, S, H, D]` tensors through SDPA (which wants `[B, H, S, D]` views).

    `attn_mask`: boolean (True = attend) or additive, broadcastable to `[B, H, Sq, Sk]`.
    """
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = additive_mask_as(attn_mask, q.dtype)
    if causal and attn_mask is not None:  # SDPA takes one or the other: fold causal in
        keep = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def additive_mask_as(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`mask` in `dtype` with its finite values kept finite: float32's most negative numbers (a
    `finfo.min` padding mask) overflow to -inf in bfloat16 and would turn eager's uniform fully
    masked rows into zero rows. -inf stays -inf."""
    if not mask.is_floating_point() or torch.finfo(dtype).max >= torch.finfo(mask.dtype).max:
        return mask.to(dtype)
    lo, hi = torch.finfo(dtype).min, torch.finfo(dtype).max
    clamped = mask.clamp(lo, hi)
    return torch.where(mask.isinf(), mask, clamped).to(dtype)
