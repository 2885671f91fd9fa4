"""FastVideo's attention backend API, as its users know it.

A backend is a bundle of static factories. Its `AttentionImpl` runs one attention site; its
`AttentionMetadataBuilder` turns the per-step state of a denoising loop (timestep, batch, args) into
an `AttentionMetadata` that every site of the step shares. fv_compile calls these exactly as
FastVideo's layers do, so a backend written for FastVideo plugs in unchanged; the optional hooks
below (`supports`, `get_supported_head_sizes`) only make fallback decisions better.

Tensor layout at the boundary is `[batch, seq, heads, head_dim]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from fv_compile.site import AttentionSite


@dataclass
class AttentionMetadata:
    """State shared by every attention site of one denoising step.

    fv_compile passes `current_timestep` into compiled graphs as a 0-d int64 tensor (as FastVideo's
    training loop does), so that stepping through a schedule never recompiles. Subclasses add their
    own fields: tensors become graph inputs, everything else selects a cached graph variant.
    """

    current_timestep: int


T = TypeVar("T", bound=AttentionMetadata)


class AttentionMetadataBuilder(ABC, Generic[T]):
    """Builds a backend's metadata once per forward context."""

    def __init__(self) -> None:  # noqa: B027 - builders are usually stateless
        pass

    def prepare(self) -> None:  # noqa: B027
        """Reset per-request state; FastVideo calls it never, kept for API parity."""

    @abstractmethod
    def build(self, current_timestep: int, forward_batch: Any, fastvideo_args: Any) -> T:
        """Return this step's metadata. Read `forward_batch` and `fastvideo_args` by attribute only,
        so that FastVideo's own `ForwardBatch` and `FastVideoArgs` objects work as well as ours."""


class AttentionImpl(ABC, Generic[T]):
    """Runs one attention site. Constructed once per site with that site's static facts."""

    @abstractmethod
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        softmax_scale: float,
        causal: bool = False,
        num_kv_heads: int | None = None,
        prefix: str = "",
        **extra_impl_args: Any,
    ) -> None: ...

    # FastVideo passes q, k and v to `preprocess_qkv` stacked along dim 0 (`[3B, S, H, D]`, one
    # call). An impl whose preprocessing treats every tensor alike (a token reorder) sets this to
    # False and is called once per tensor instead, which saves the copy that stacking costs.
    stacked_preprocess: bool = True

    def preprocess_qkv(self, qkv: torch.Tensor, attn_metadata: T) -> torch.Tensor:
        """Transform the stacked `[3B, S, H, D]` q/k/v of a self-attention site (e.g. reorder
        tokens into tiles), or each `[B, S, H, D]` tensor alone when `stacked_preprocess` is
        False. Called only when q, k and v have the same shape."""
        return qkv

    def postprocess_output(self, output: torch.Tensor, attn_metadata: T) -> torch.Tensor:
        """Undo `preprocess_qkv` on the `[B, S, H, D]` output."""
        return output

    @abstractmethod
    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_metadata: T
    ) -> torch.Tensor:
        """`[B, Sq, H, D]`, `[B, Sk, Hk, D]`, `[B, Sk, Hk, Dv]` -> `[B, Sq, H, Dv]`.

        A site's own mask reaches the impl as `attn_metadata.attn_mask`: boolean (True = attend)
        or additive float, broadcastable to `[B, H, Sq, Sk]`; `None` when the site has none."""


class AttentionBackend(ABC):
    """A registry entry: static factories only, never instantiated."""

    accept_output_buffer: bool = False

    @staticmethod
    @abstractmethod
    def get_name() -> str: ...

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]: ...

    @staticmethod
    @abstractmethod
    def get_metadata_cls() -> type[AttentionMetadata]: ...

    @staticmethod
    @abstractmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder]: ...

    @staticmethod
    def supports(site: AttentionSite) -> str | None:
        """None when this backend can run `site`, else the reason it cannot (shown by `explain`).
        The default accepts everything; backends with limits override it."""
        return None


class AttentionLayer(Protocol):
    """FastVideo's (vLLM-derived) layer protocol, kept for type compatibility."""

    _k_scale: torch.Tensor
    _v_scale: torch.Tensor
    _k_scale_float: float
    _v_scale_float: float

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor: ...
