"""SAGE_ATTN: 8-bit attention (SageAttention2's recipe) in our own Triton kernel, on `[B, S, H, D]`.

K smoothed by its mean over tokens, Q by its mean over tokens with the correction added back as
an exact per-key bias, Q and K in INT8 per token, P V in FP8 e4m3 with V scaled per channel
(fp16 before sm89), fp32 two-level accumulation (`kernels/sage_fwd.py`). Head dims 64 and 128,
bf16/fp16, causal (top-left, as SDPA), GQA, cross-attention; no masks.

Approximate by design: its output is not dense attention (cosine >= 0.999 against exact attention
in the tests), so it is forward only (`differentiable = False`: a backward through it raises)
and plain `auto` never picks it; `auto` with an accuracy budget (`fv_compile.compile(model,
accuracy_budget=0.02)`) picks it at the sites where it is faster and its error, measured on the
site's own inputs, is within the budget (`fv_compile/tuning.py`). Or choose it by name.
On the CPU it runs only under the Triton interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import importlib
from typing import Any

from fv_compile.backends._dense import DenseBackend, DenseImpl
from fv_compile.backends.kernels import SAGE_HEAD_DIMS, interpreting
from fv_compile.site import AttentionSite


class SageAttentionImpl(DenseImpl):
    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, *args: Any, **kw: Any):
        if head_size not in SAGE_HEAD_DIMS:
            raise ValueError(f"SAGE_ATTN supports head dims {SAGE_HEAD_DIMS}, got {head_size}")
        super().__init__(num_heads, head_size, softmax_scale, *args, **kw)

    def forward(self, query, key, value, attn_metadata):
        from fv_compile.backends.kernels.sage_fwd import sage_attention_fwd  # imports triton

        if getattr(attn_metadata, "attn_mask", None) is not None:
            raise ValueError("SAGE_ATTN takes no attention mask")
        return sage_attention_fwd(query, key, value, softmax_scale=self.scale, causal=self.causal)


class SageAttentionBackend(DenseBackend):
    head_sizes = SAGE_HEAD_DIMS
    dtypes = ("bfloat16", "float16")  # it quantises 16-bit activations; fp32 sites stay exact
    mask_kinds = ()
    causal_cross = True  # top-left aligned, as SDPA
    differentiable = False  # an approximation: fv_compile's exact dense backward would not match
    approximate = True  # a candidate of `auto` under an accuracy budget, measured per site

    @staticmethod
    def get_name() -> str:
        return "SAGE_ATTN"

    @staticmethod
    def get_impl_cls() -> type[SageAttentionImpl]:
        return SageAttentionImpl

    @staticmethod
    def supports(site: AttentionSite) -> str | None:
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed (pip install triton)"
        if not site.device.startswith("cuda") and not interpreting():
            return f"device {site.device} (needs CUDA)"
        return None
