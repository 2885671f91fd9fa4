"""Support checks shared by the dense kernel backends."""

from __future__ import annotations

import os

from fv_compile.site import AttentionSite


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def common_limits(
    site: AttentionSite,
    *,
    head_dims: tuple[int, ...] | None,
    dtypes: tuple[str, ...],
    cpu_ok: bool,
    masks: bool,
    causal_cross: bool,
) -> str | None:
    """The first limit `site` breaks, phrased for `explain`, or None."""
    if head_dims is not None and site.head_dim not in head_dims:
        return f"head dim {site.head_dim} (supported: {', '.join(map(str, head_dims))})"
    if site.value_head_dim != site.head_dim:
        return f"value head dim {site.value_head_dim} differs from qk head dim {site.head_dim}"
    if site.dtype not in dtypes:
        return f"dtype {site.dtype} (supported: {', '.join(dtypes)})"
    if not site.device.startswith("cuda") and not cpu_ok:
        return f"device {site.device} (needs CUDA)"
    if site.mask is not None and not masks:
        return f"{site.mask} attention mask"
    if site.causal and site.q_len != site.kv_len and not causal_cross:
        return "causal with q length != kv length"
    if site.heads is None or site.kv_heads is None or site.heads % site.kv_heads:
        return "heads not divisible by kv heads"
    return None
