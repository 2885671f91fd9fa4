"""FLASH_ATTN: flash-attn's kernels — FA4 (`flash_attn.cute`), FA3 (`flash_attn_interface`) or
FA2 (`flash_attn`), the fastest one installed.

On the H200 FA4 is the fastest dense kernel measured (docs/benchmarks.md). The kernel runs inside
`fv_compile::attention`, itself a custom op with a fake, so no flash-attn function is traced.

Key padding masks (boolean, or additive 0 / one blocking value, varying over batch and keys
only: HunyuanVideo's and LTX-Video's text padding) run on FA4 too: each batch element's kept keys
are gathered first (`kernels/key_padding.py`) and FA4 attends `seqused_k` of them, per batch
element, through `flash_attn_varlen_func` on the batched tensors. That keeps FA4's unmasked
kernel (on Hopper its 192-key tiles, which its block-sparse path gives up for 128) and its
unmasked tile scheduler; the mask costs one gather of k and v. Not with causal attention.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from fv_compile.backends._dense import DenseBackend, DenseImpl
from fv_compile.backends.kernels.fa4_import import import_flash_attn_cute
from fv_compile.backends.kernels.key_padding import KeyPadding, key_padded_attention
from fv_compile.errors import MissingDependency
from fv_compile.site import (
    KEY_PADDING_KINDS,
    MASK_ADDITIVE_KEY_PADDING,
    MASK_KEY_PADDING,
    AttentionSite,
)

# (label, module, function), fastest first
_CANDIDATES = (
    ("FA4", "flash_attn.cute", "flash_attn_func"),
    ("FA3", "flash_attn_interface", "flash_attn_func"),
    ("FA2", "flash_attn", "flash_attn_func"),
)
_INSTALL = (
    "FLASH_ATTN needs flash-attn: `pip install flash-attn-4` (FA4, Hopper/Blackwell), or FA3 "
    "(`flash_attn_interface`) or FA2 (`pip install flash-attn`)"
)


@functools.cache
def flash_kernel() -> tuple[str, Callable[..., Any]] | None:
    """`(label, flash_attn_func)` of the fastest flash-attn installed, or None."""
    for label, module, name in _CANDIDATES:
        try:
            loaded = (
                import_flash_attn_cute()
                if module == "flash_attn.cute"
                else importlib.import_module(module)
            )
            fn = getattr(loaded, name)
        except Exception:
            continue
        return label, fn
    return None


@functools.cache
def flash_varlen_kernel() -> Callable[..., Any] | None:
    """flash-attn-4's `flash_attn_varlen_func` when it takes per-batch key lengths (`seqused_k`)
    on batched `[B, S, H, D]` tensors, else None (FA3 and FA2 are not used for masked sites)."""
    found = flash_kernel()
    if found is None or found[0] != "FA4":
        return None
    try:
        fn = import_flash_attn_cute().flash_attn_varlen_func
        params = inspect.signature(fn).parameters
    except Exception:
        return None
    return fn if "seqused_k" in params and "cu_seqlens_k" in params else None


class FlashAttentionImpl(DenseImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        found = flash_kernel()
        if found is None:
            raise MissingDependency(_INSTALL)
        self.kernel_name, self.kernel = found
        super().__init__(*args, **kwargs)
        self.padding = KeyPadding.of_site(kwargs.get("site"))

    def forward(self, query, key, value, attn_metadata):
        mask = getattr(attn_metadata, "attn_mask", None)
        if mask is not None:
            return self._key_padded(query, key, value, mask)
        out = self.kernel(query, key, value, softmax_scale=self.scale, causal=self.causal)
        return out[0] if isinstance(out, tuple) else out

    def _key_padded(self, query, key, value, mask):
        varlen = flash_varlen_kernel()
        if varlen is None:
            raise ValueError(
                f"FLASH_ATTN on {self.kernel_name} takes no attention mask (flash-attn-4 does)"
            )
        if self.causal:
            raise ValueError("FLASH_ATTN takes a key padding mask without causal only")

        def run(q, k, v, counts):
            # a batch element keeping no key: FA4 gets one (its rows are the op's to fix, or
            # `key_padded_attention`'s), so no kernel ever runs on an empty key range
            out = varlen(
                q, k, v, seqused_k=counts.clamp(min=1), softmax_scale=self.scale, causal=False
            )
            return out[0] if isinstance(out, tuple) else out

        return key_padded_attention(query, key, value, mask, self.padding, run)


class FlashAttentionBackend(DenseBackend):
    head_sizes = range(8, 257, 8)
    dtypes = ("bfloat16", "float16")
    devices = ("cuda",)
    mask_kinds = (MASK_KEY_PADDING, MASK_ADDITIVE_KEY_PADDING)  # on FA4, through seqused_k
    mask_with_causal = False  # the keys are reordered
    causal_cross = False  # flash-attn aligns causal bottom-right, SDPA top-left
    differentiable = True

    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"

    @staticmethod
    def get_impl_cls() -> type[FlashAttentionImpl]:
        return FlashAttentionImpl

    @staticmethod
    def supports(site: AttentionSite) -> str | None:
        found = flash_kernel()
        if found is None:
            return "flash-attn is not installed: pip install flash-attn-4 (Hopper/Blackwell) or flash-attn"
        if site.mask_kind in KEY_PADDING_KINDS and flash_varlen_kernel() is None:
            return f"a key padding mask needs flash-attn-4's seqused_k ({found[0]} is installed)"
        return None
