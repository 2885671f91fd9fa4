"""What the dense backends share: an impl that keeps the site's static facts, and a backend with
no per-step metadata (FastVideo's dense backends have no builder either)."""

from __future__ import annotations

from typing import Any

from fv_compile.backends.abstract import AttentionBackend, AttentionImpl, AttentionMetadata


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
    def get_metadata_cls() -> type[AttentionMetadata]:
        return AttentionMetadata

    @staticmethod
    def get_builder_cls() -> None:  # type: ignore[override]
        return None
