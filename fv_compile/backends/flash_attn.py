"""FLASH_ATTN: flash-attn's kernels — FA4 (`flash_attn.cute`), FA3 (`flash_attn_interface`) or
FA2 (`flash_attn`), the fastest one installed.

On the H200 FA4 is the fastest dense kernel measured (docs/benchmarks.md). The kernel runs inside
`fv_compile::attention`, itself a custom op with a fake, so no flash-attn function is traced.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from fv_compile.backends._dense import DenseBackend, DenseImpl
from fv_compile.backends.kernels.fa4_import import import_flash_attn_cute
from fv_compile.errors import MissingDependency
from fv_compile.site import AttentionSite

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
            loaded = import_flash_attn_cute() if module == "flash_attn.cute" else importlib.import_module(module)
            fn = getattr(loaded, name)
        except Exception:
            continue
        return label, fn
    return None


class FlashAttentionImpl(DenseImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        found = flash_kernel()
        if found is None:
            raise MissingDependency(_INSTALL)
        self.kernel_name, self.kernel = found
        super().__init__(*args, **kwargs)

    def forward(self, query, key, value, attn_metadata):
        if getattr(attn_metadata, "attn_mask", None) is not None:
            raise ValueError("FLASH_ATTN does not take an attention mask")
        out = self.kernel(query, key, value, softmax_scale=self.scale, causal=self.causal)
        return out[0] if isinstance(out, tuple) else out


class FlashAttentionBackend(DenseBackend):
    head_sizes = range(8, 257, 8)
    dtypes = ("bfloat16", "float16")
    devices = ("cuda",)
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
        if flash_kernel() is None:
            return "flash-attn is not installed: pip install flash-attn-4 (Hopper/Blackwell) or flash-attn"
        return None
