"""TRITON_ATTN: our Triton flash-attention forward, reading and writing `[B, S, H, D]` directly.

The portable fast path, and the base of the block-sparse kernels. Head dims 64 and 128, bf16/fp16
(fp32 for tests), causal (top-left, as SDPA), GQA, cross-attention. Key padding masks (boolean, or
additive 0 / one blocking value, over batch and keys only) run on the kernel's per-batch key
lengths, each batch element's kept keys gathered first (`kernels/key_padding.py`), without causal;
other masks go to a dense fallback. On the CPU it runs only under the Triton interpreter
(`TRITON_INTERPRET=1`).
The kernel (`kernels/flash_fwd.py`) imports Triton, so it loads on the first call, and a missing
Triton is a fallback reason instead of an import error.
"""

from __future__ import annotations

import importlib
from typing import Any

from fv_compile.backends._dense import DenseBackend, DenseImpl
from fv_compile.backends.kernels import TRITON_HEAD_DIMS, interpreting
from fv_compile.backends.kernels.key_padding import KeyPadding, key_padded_attention
from fv_compile.site import MASK_ADDITIVE_KEY_PADDING, MASK_KEY_PADDING, AttentionSite


class TritonAttentionImpl(DenseImpl):
    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, *args: Any, **kw: Any):
        if head_size not in TRITON_HEAD_DIMS:
            raise ValueError(f"TRITON_ATTN supports head dims {TRITON_HEAD_DIMS}, got {head_size}")
        super().__init__(num_heads, head_size, softmax_scale, *args, **kw)
        self.padding = KeyPadding.of_site(kw.get("site"))

    def forward(self, query, key, value, attn_metadata):
        from fv_compile.backends.kernels.flash_fwd import attention_fwd  # imports triton

        mask = getattr(attn_metadata, "attn_mask", None)
        if mask is None:
            return attention_fwd(query, key, value, softmax_scale=self.scale, causal=self.causal)
        if self.causal:
            raise ValueError("TRITON_ATTN takes a key padding mask without causal only")

        def run(q, k, v, counts):  # a batch element keeping no key gets zeros
            return attention_fwd(q, k, v, softmax_scale=self.scale, kv_lengths=counts)

        return key_padded_attention(query, key, value, mask, self.padding, run)


class TritonAttentionBackend(DenseBackend):
    head_sizes = TRITON_HEAD_DIMS
    dtypes = ("bfloat16", "float16", "float32")
    mask_kinds = (MASK_KEY_PADDING, MASK_ADDITIVE_KEY_PADDING)  # through kv_lengths
    mask_with_causal = False  # the keys are reordered
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
