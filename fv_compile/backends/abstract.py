"""FastVideo's attention backend API, as its users know it.

A backend is a bundle of static factories. Its `AttentionImpl` runs one attention site; its
`AttentionMetadataBuilder` turns the per-step state of a denoising loop (timestep, batch, args) into
an `AttentionMetadata` that every site of the step shares. fv_compile calls these exactly as
FastVideo's layers do, so a backend written for FastVideo plugs in unchanged.

What a backend can run is declared on its class (`AttentionBackend`'s capability attributes:
roles, head sizes, dtypes, devices, mask kinds, causal, differentiable) and read in one place,
`capabilities()` / `unsupported_reason()` below. A FastVideo backend declares none of them and
gets the defaults: conservative wherever a wrong guess would compute something other than the
model (no masks, no causal cross-attention, forward only), open where the backend's own
construction or FastVideo's `get_supported_head_sizes()` says more.

Tensor layout at the boundary is `[batch, seq, heads, head_dim]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from fv_compile.site import (
    MASK_ADDITIVE,
    MASK_ADDITIVE_KEY_PADDING,
    MASK_BOOL,
    MASK_KEY_PADDING,
    AttentionSite,
)


@dataclass
class AttentionMetadata:
    """State shared by every attention site of one denoising step.

    fv_compile passes `current_timestep` into compiled graphs as a 0-d int64 tensor (as FastVideo's
    training loop does), so that stepping through a schedule never recompiles. Subclasses add their
    own fields: tensors become graph inputs, everything else selects a cached graph variant.
    """

    current_timestep: int


@dataclass
class SiteMetadata(AttentionMetadata):
    """What the impl of a backend without a metadata builder receives: the site's own mask, if
    any (`current_timestep` is 0: such a backend has no per-step state)."""

    attn_mask: torch.Tensor | None = None


T = TypeVar("T", bound=AttentionMetadata)


class AttentionMetadataBuilder(ABC, Generic[T]):
    """Builds a backend's metadata once per forward context."""

    def __init__(self) -> None:  # builders are usually stateless
        pass

    def prepare(self) -> None:
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
        False. Called only when q, k and v have the same shape (with `stacked_preprocess` False:
        the same batch and tokens; GQA's k and v may have fewer heads)."""
        return qkv

    def postprocess_output(self, output: torch.Tensor, attn_metadata: T) -> torch.Tensor:
        """Undo `preprocess_qkv` on the `[B, S, H, D]` output."""
        return output

    # An impl of a backend that declares `token_permutation` may be called with
    # `attn_metadata.tokens_permuted = True` (an attribute fv_compile sets on the metadata object
    # of that call): the video tokens of q, k, v, and of the site's key mask, then already sit in
    # the order the permutation names, and the output must stay in it. Its preprocess_qkv and
    # postprocess_output are still called, for whatever else they do (placing text tokens).

    @abstractmethod
    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_metadata: T
    ) -> torch.Tensor:
        """`[B, Sq, H, D]`, `[B, Sk, Hk, D]`, `[B, Sk, Hk, Dv]` -> `[B, Sq, H, Dv]`.

        A site's own mask reaches the impl as `attn_metadata.attn_mask`: boolean (True = attend)
        or additive float, broadcastable to `[B, H, Sq, Sk]`; `None` when the site has none. Only
        masks of the kinds the backend declares (`AttentionBackend.mask_kinds`) reach it."""

    # An impl whose output is not dense attention by design (a sparse pattern) may define
    #     reference(self, query, key, value, attn_metadata) -> torch.Tensor
    # taking what the op receives (the site's own token order, before `preprocess_qkv`) and
    # returning, in float32 and plain torch ops independent of the kernels, the output its
    # preprocess_qkv, forward and postprocess_output are meant to compute together. `verify`
    # then holds each such site to its definition (a kernel or reorder bug fails the check),
    # and shows the output's distance from the traced dense code beside it, as information.
    # Without it, `verify` compares the site with the traced code, as it does dense ones.

    def backward(
        self,
        grad: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_metadata: T,
    ) -> list[torch.Tensor]:
        """`[dq, dk, dv]` of this impl's whole site (preprocess, forward, postprocess) for the
        output gradient `grad`, each like its input, from the site's own (unpreprocessed) q, k,
        v and the call's metadata, rebuilt as the forward had it.

        An impl whose output is not dense attention (a sparse one that chooses what to attend
        from the data) overrides this to train: fv_compile's op then runs it as its backward.
        Not overridden, the op's backward is dense recomputation, which only a backend declaring
        `differentiable = True` (its output is dense attention) may use."""
        raise NotImplementedError


class AttentionBackend(ABC):
    """A registry entry: static factories and declared capabilities, never instantiated.

    The capabilities say which sites the backend can run; the policy falls back to a dense
    backend (or raises, with `strict=True`) for the others, and `explain` shows every reason.
    `None` means "no limit"."""

    # -- capabilities: read by `capabilities()` and nowhere else ---------------------------------
    roles: ClassVar[Collection[str] | None] = (
        None  # site roles it serves ("self", "cross", "joint")
    )
    # head dims it runs; None: FastVideo's `get_supported_head_sizes()` if defined, else any
    head_sizes: ClassVar[Collection[int] | None] = None
    dtypes: ClassVar[Collection[str] | None] = None  # e.g. ("bfloat16", "float16")
    devices: ClassVar[Collection[str] | None] = None  # device types, e.g. ("cuda",)
    # the site masks its impl applies (`attn_metadata.attn_mask`): MASK_BOOL, MASK_ADDITIVE,
    # MASK_KEY_PADDING, MASK_ADDITIVE_KEY_PADDING (a MASK_BOOL backend takes key padding too, a
    # MASK_ADDITIVE one additive key padding); () for none
    mask_kinds: ClassVar[Collection[str]] = ()
    causal: ClassVar[bool] = True  # top-left causal (SDPA's `is_causal`) with q length == kv length
    mask_with_causal: ClassVar[bool] = True  # it applies its mask kinds together with causal too
    causal_cross: ClassVar[bool] = False  # ... and top-left causal with q length != kv length
    value_head_dim_differs: ClassVar[bool] = False  # v's head dim may differ from q's and k's
    # needs `num_heads`, `num_kv_heads` known and `num_heads % num_kv_heads == 0`
    needs_head_groups: ClassVar[bool] = True
    # its output is dense attention, so fv_compile's backward (dense recomputation) is exact for it:
    # a compiled model can train through it
    differentiable: ClassVar[bool] = False
    # its output approximates dense attention (quantised kernels: SAGE_ATTN): `auto` runs it only
    # under an accuracy budget (`fv_compile.compile(..., accuracy_budget=...)`), and only at
    # sites where its error, measured on the site's own inputs, is within the budget
    approximate: ClassVar[bool] = False
    # `(gather, scatter)`: the names of two metadata fields that, at a step where both are
    # tensors, hold the permutation of the video tokens the impl works in (long `[N]`: the token
    # at position i of that order is raster token `gather[i]`; `scatter` is the inverse), and in
    # which its preprocess_qkv / postprocess_output put them. Declared, fv_compile may run the
    # whole stretch of a graph between the backend's first and last site in that order when it
    # proves the stretch token-wise, gathering once where the tokens enter and scattering once
    # where they leave; the impl is then told (`attn_metadata.tokens_permuted`, see AttentionImpl)
    token_permutation: ClassVar[tuple[str, str] | None] = None
    label: ClassVar[str | None] = None  # a short name for reasons (STA); None: get_name()

    @staticmethod
    @abstractmethod
    def get_name() -> str: ...

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]: ...

    @staticmethod
    @abstractmethod
    def get_metadata_cls() -> type[AttentionMetadata]:
        """The class the builder's metadata is an instance of; `SiteMetadata`, what the impl
        receives, for a backend without a builder."""

    @staticmethod
    @abstractmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder] | None:
        """The metadata builder class; None for a backend that needs no per-step metadata."""

    @staticmethod
    def supports(site: AttentionSite) -> str | None:
        """What the declarations cannot say: None when the environment lets this backend run
        `site` (its package is installed, its kernel runs on this device), else why not. The
        default has nothing to add."""
        return None

    @staticmethod
    def traced_in_training(site: AttentionSite) -> bool:
        """Whether a training graph may run `site` (one whose output requires grad) as its
        impl's own code: preprocess_qkv, forward and postprocess_output traced into the graph
        as fv_compile's op runs them, so that autograd differentiates them and keeps what their
        backward needs from the forward (the op's backward recomputes the forward first).
        Declare it only where that code is torch ops and custom ops with exact autograd
        formulas, with no Python decision on tensor values, and where the tokens preprocessing
        adds (padding slots) get no gradient. The default: never."""
        return False

    @classmethod
    def unsupported_reason(cls, site: AttentionSite) -> str | None:
        """Every reason this backend cannot run `site`, joined; None when it can."""
        return unsupported_reason(cls, site)


@dataclass(frozen=True)
class Capabilities:
    """What a backend class declares it can run (see `AttentionBackend`), defaults filled in."""

    name: str
    roles: tuple[str, ...] | None
    head_sizes: Collection[int] | None
    dtypes: frozenset[str] | None
    devices: frozenset[str] | None
    mask_kinds: frozenset[str]
    causal: bool
    mask_with_causal: bool
    causal_cross: bool
    value_head_dim_differs: bool
    needs_head_groups: bool
    differentiable: bool
    token_permutation: tuple[str, str] | None = None
    approximate: bool = False

    def unsupported_reasons(self, site: AttentionSite) -> list[str]:
        """Every declared limit `site` breaks, phrased for `explain`."""
        out = []
        if self.roles is not None and site.role not in self.roles:
            out.append(
                f"{site.role}-attention ({self.name} serves {'/'.join(self.roles)} attention)"
            )
        if self.roles is not None and site.role == "joint" and site.joint_text_len is None:
            out.append(
                "joint attention whose video tokens are not known (its sequence joins pieces "
                "whose lengths do not single out the video: equal, or the longest in the middle)"
            )
        if self.head_sizes is not None and site.head_dim not in self.head_sizes:
            out.append(f"head dim {site.head_dim} (supported: {describe_sizes(self.head_sizes)})")
        if not self.value_head_dim_differs and site.value_head_dim != site.head_dim:
            out.append(
                f"value head dim {site.value_head_dim} differs from qk head dim {site.head_dim}"
            )
        if self.dtypes is not None and site.dtype not in self.dtypes:
            out.append(f"dtype {site.dtype} (supported: {', '.join(sorted(self.dtypes))})")
        device = site.device.split(":")[0]
        if self.devices is not None and device not in self.devices:
            needs = " or ".join(d.upper() if d == "cuda" else d for d in sorted(self.devices))
            out.append(f"device {site.device} (needs {needs})")
        if site.causal and not self.causal:
            out.append("causal attention")
        elif site.causal and site.q_len != site.kv_len and not self.causal_cross:
            out.append("causal with q length != kv length")
        why = self._mask_reason(site)
        if why is not None:
            out.append(why)
        elif site.causal and site.mask is not None and not self.mask_with_causal:
            out.append(
                f"causal attention with an attention mask ({self.name} takes masks without causal)"
            )
        if self.needs_head_groups and (
            site.heads is None or site.kv_heads is None or site.heads % site.kv_heads
        ):
            out.append("heads not divisible by kv heads")
        return out

    def _mask_reason(self, site: AttentionSite) -> str | None:
        kind = site.mask_kind
        if kind is None or kind in self.mask_kinds:
            return None
        if kind == MASK_KEY_PADDING and MASK_BOOL in self.mask_kinds:
            return None
        if kind == MASK_ADDITIVE_KEY_PADDING and MASK_ADDITIVE in self.mask_kinds:
            return None
        if not self.mask_kinds:
            return f"{site.mask} attention mask"
        order = sorted(
            self.mask_kinds, key=lambda k: (_MASK_ORDER.index(k) if k in _MASK_ORDER else 9, k)
        )
        takes = [_MASK_WORDS.get(k, k) for k in order]
        if kind in (
            MASK_ADDITIVE,
            MASK_ADDITIVE_KEY_PADDING,
        ):  # say the other masks it takes are boolean
            takes = [t if t.startswith(("boolean", "additive")) else f"boolean {t}" for t in takes]
        what = {
            MASK_BOOL: "boolean mask over queries or heads",
            MASK_ADDITIVE: "additive attention mask",
            MASK_ADDITIVE_KEY_PADDING: "additive key padding mask",
        }.get(kind, kind)
        if kind == MASK_ADDITIVE and MASK_ADDITIVE_KEY_PADDING in self.mask_kinds:
            what += f" that is not key padding: {site.additive_padding_issue()}"  # say why not
        return f"{what} ({self.name} takes {' and '.join(takes)})"


_MASK_WORDS = {
    MASK_BOOL: "boolean masks",
    MASK_ADDITIVE: "additive attention masks",
    MASK_KEY_PADDING: "key padding masks",
    MASK_ADDITIVE_KEY_PADDING: "additive key padding masks",
}
_MASK_ORDER = [MASK_BOOL, MASK_ADDITIVE, MASK_KEY_PADDING, MASK_ADDITIVE_KEY_PADDING]


def describe_sizes(sizes: Collection[int]) -> str:
    """`64, 128`, or `multiples of 8 up to 256` for `range(8, 257, 8)`."""
    if isinstance(sizes, range) and sizes.start == sizes.step and len(sizes) > 2:
        return f"multiples of {sizes.step} up to {sizes[-1]}"
    return ", ".join(str(s) for s in sizes)


def capabilities(backend_cls: type) -> Capabilities:
    """The capabilities `backend_cls` declares, the defaults of `AttentionBackend` for what it
    does not (a FastVideo backend subclasses FastVideo's base, not ours)."""
    base = AttentionBackend

    def declared(attr: str) -> Any:
        return getattr(backend_cls, attr, getattr(base, attr))

    head_sizes = declared("head_sizes")
    fastvideo_sizes = getattr(backend_cls, "get_supported_head_sizes", None)
    if head_sizes is None and callable(fastvideo_sizes):
        head_sizes = fastvideo_sizes()
    roles, dtypes, devices = declared("roles"), declared("dtypes"), declared("devices")
    name = declared("label") or _name_of(backend_cls)
    permutation = declared("token_permutation")
    if permutation is not None:
        gather, scatter = permutation  # two field names
        permutation = (str(gather), str(scatter))
    return Capabilities(
        name=name,
        roles=None if roles is None else tuple(roles),
        head_sizes=None
        if head_sizes is None
        else head_sizes
        if isinstance(head_sizes, range)
        else tuple(head_sizes),
        dtypes=None if dtypes is None else frozenset(dtypes),
        devices=None if devices is None else frozenset(devices),
        mask_kinds=frozenset(declared("mask_kinds")),
        causal=bool(declared("causal")),
        mask_with_causal=bool(declared("mask_with_causal")),
        causal_cross=bool(declared("causal_cross")),
        value_head_dim_differs=bool(declared("value_head_dim_differs")),
        needs_head_groups=bool(declared("needs_head_groups")),
        differentiable=bool(declared("differentiable")),
        token_permutation=permutation,
        approximate=bool(declared("approximate")),
    )


def _name_of(backend_cls: type[Any]) -> str:  # ours or FastVideo's: duck-typed
    try:
        return str(backend_cls.get_name())
    except Exception:
        return backend_cls.__name__


def unsupported_reason(backend_cls: type, site: AttentionSite) -> str | None:
    """None if `backend_cls` can run `site`, else every reason it cannot, joined with "; ": its
    environment's (`supports`) first, then each declared limit the site breaks."""
    reasons = []
    check = getattr(backend_cls, "supports", None)
    env = check(site) if callable(check) else None
    if env is not None:
        reasons.append(env)
    reasons += capabilities(backend_cls).unsupported_reasons(site)
    return "; ".join(reasons) if reasons else None


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
