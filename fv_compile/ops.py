"""The op every attention site is rewritten to, and the registries it resolves at run time.

`fv_compile::attention(q, k, v, mask, site, variant, metadata)` is a `torch.library.custom_op`
with a fake implementation: opaque to Inductor (no graph break, no retracing of backend code),
CUDA-graph safe (everything that changes per step arrives as a tensor). `site` and `variant` are
constants baked into the graph: `site` picks the `AttentionImpl` built for that site at compile
time, `variant` the layout that rebuilds the backend's metadata object from the `metadata` tensors.

Sites and variants are registered through a `SiteOwner`, which whoever runs the graph holds (the
compiled model's graphs, a variant dispatch, a rewritten GraphModule): when the owner is freed,
its entries leave the registry with it, so compiling model after model in one process does not
keep every impl of every compile alive. Ids are never reused.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import weakref
from dataclasses import dataclass, replace
from typing import Any, TypedDict

import torch

from fv_compile.backends.abstract import AttentionImpl, SiteMetadata
from fv_compile.errors import FvCompileError, NotSupportedByBackend
from fv_compile.metadata import MetadataLayout


@dataclass
class SiteRuntime:
    """What the op needs to run one site."""

    impl: AttentionImpl
    backend: str
    scale: float
    causal: bool
    differentiable: bool  # the backend declares it: backward by dense recomputation is exact
    preprocess: bool  # the impl overrides preprocess_qkv
    postprocess: bool  # the impl overrides postprocess_output
    # what eager gives a query row whose every key is blocked ("zero" | "nan" | "uniform"), None
    # when no row can be; and for "uniform" the finite value blocked logits end at
    empty_rows: str | None = None
    fill: float | None = None
    # the graph hands this site q, k and v with their video tokens already in the order its
    # backend works in (`AttentionBackend.token_permutation`): the impl is told so through
    # `attn_metadata.tokens_permuted`, and returns its output in that order
    tokens_permuted: bool = False
    # the impl overrides `backward`: the op's backward is the impl's own, not dense recomputation
    own_backward: bool = False
    # what sequence parallelism needs: the site's role (self | cross | joint), for joint
    # attention its text segment, and the site's path for messages
    role: str = "self"
    joint_text_len: int | None = None
    joint_text_first: bool | None = None
    where: str = ""
    # a site that trains whose backend lets a training graph run it as the impl's own code
    # (`AttentionBackend.traced_in_training`): the graph handed to the compiler calls
    # `traced_site`, not the op, so autograd keeps what the impl's backward needs
    traced: bool = False

    def on_backend(self, impl: AttentionImpl, backend: str, differentiable: bool) -> SiteRuntime:
        """The same site run by `impl` of `backend` (an accuracy-budget candidate): the site's
        facts kept (scale, causal, blocked rows, role, ...), the impl's own derived again."""
        return replace(
            self,
            impl=impl,
            backend=backend,
            differentiable=differentiable,
            traced=False,  # a candidate is measured through the op
            **_impl_overrides(impl),
        )


class _ImplOverrides(TypedDict):
    preprocess: bool
    postprocess: bool
    own_backward: bool


def _impl_overrides(impl: AttentionImpl) -> _ImplOverrides:
    """Which of `AttentionImpl`'s optional steps `impl`'s class overrides."""
    cls = type(impl)
    return _ImplOverrides(
        preprocess=cls.preprocess_qkv is not AttentionImpl.preprocess_qkv,
        postprocess=cls.postprocess_output is not AttentionImpl.postprocess_output,
        own_backward=cls.backward is not AttentionImpl.backward,
    )


# site id -> what runs it; variant id -> the metadata layout of each backend (0: no metadata)
_SITES: dict[int, SiteRuntime] = {}
_VARIANTS: dict[int, dict[str, MetadataLayout]] = {0: {}}
_site_ids = itertools.count(1)
_variant_ids = itertools.count(1)


class SiteOwner:
    """Registers sites and graph variants, and keeps them registered while it is alive."""

    def __init__(self) -> None:
        self.sites: list[int] = []
        self.variants: list[int] = []
        weakref.finalize(self, _forget, self.sites, self.variants)

    def register_site(
        self,
        impl: AttentionImpl,
        backend: str,
        scale: float,
        causal: bool,
        differentiable: bool,
        empty_rows: str | None = None,
        fill: float | None = None,
        *,
        role: str = "self",
        joint_text_len: int | None = None,
        joint_text_first: bool | None = None,
        where: str = "",
        traced: bool = False,
    ) -> int:
        """The id of a new site run by `impl`; `differentiable`: the backend declares its output
        dense attention, so the op's backward (dense recomputation) is exact for it."""
        if empty_rows not in (None, "zero", "nan", "uniform"):
            raise ValueError(
                f"empty_rows must be None, 'zero', 'nan' or 'uniform', got {empty_rows!r}"
            )
        if (empty_rows == "uniform") != (fill is not None):
            raise ValueError("a finite fill value goes with empty_rows='uniform', and only with it")
        rt = SiteRuntime(
            impl=impl,
            backend=backend,
            scale=scale,
            causal=causal,
            differentiable=differentiable,
            **_impl_overrides(impl),
            empty_rows=empty_rows,
            fill=fill,
            role=role,
            joint_text_len=joint_text_len,
            joint_text_first=joint_text_first,
            where=where,
            traced=traced,
        )
        return self.register_runtime(rt)

    def register_runtime(self, rt: SiteRuntime) -> int:
        """The id of a new site that `rt` runs: a copy of a registered site with one fact
        changed (`dataclasses.replace`) keeps every other fact of it."""
        sid = next(_site_ids)
        _SITES[sid] = rt
        self.sites.append(sid)
        return sid

    def register_variant(self, layouts: dict[str, MetadataLayout]) -> int:
        """The id of a graph variant whose sites rebuild their metadata with `layouts`."""
        vid = next(_variant_ids)
        _VARIANTS[vid] = dict(layouts)
        self.variants.append(vid)
        return vid


def _forget(sites: list[int], variants: list[int]) -> None:
    for sid in sites:
        _SITES.pop(sid, None)
    for vid in variants:
        _VARIANTS.pop(vid, None)


def site_runtime(site: int) -> SiteRuntime:
    return _SITES[site]


def _metadata_for(rt: SiteRuntime, mask: torch.Tensor | None, variant: int, tensors) -> Any:
    layout = _VARIANTS[variant].get(rt.backend)
    if layout is None:
        return SiteMetadata(current_timestep=0, attn_mask=mask)
    md = layout.rebuild(list(tensors))
    if mask is not None or not hasattr(md, "attn_mask"):
        try:
            object.__setattr__(md, "attn_mask", mask)
        except AttributeError:
            raise FvCompileError(
                f"{type(md).__name__} cannot carry the site's attention mask: give it an "
                "`attn_mask` field or drop __slots__"
            ) from None
    return md


@torch.library.custom_op("fv_compile::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    site: int,
    variant: int,
    metadata: list[torch.Tensor],
) -> torch.Tensor:
    """`[B, Sq, H, D]`, `[B, Sk, Hk, D]`, `[B, Sk, Hk, Dv]` -> `[B, Sq, H, Dv]` (contiguous)."""
    # the op's body runs on real tensors, outside autograd: its output may be written in place
    return _run_site(q, k, v, mask, site, variant, metadata, own_output=True)


def traced_site(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    site: int,
    variant: int,
    metadata: list[torch.Tensor],
    *,
    reference: bool = False,
) -> torch.Tensor:
    """What `fv_compile::attention` computes, as the code a trace sees through: a training graph
    calls it for the sites marked `traced` (`lowering.trace_training_sites`), so autograd runs
    the impl's own differentiable ops and keeps what their backward needs from the forward
    (SDPA's log-sum-exp, VSA's block lists), where the op's backward recomputes the forward.

    With `reference` (`verify`, at a site whose impl has one, see AttentionImpl): what the op
    is defined to compute there, the impl's `reference` in place of preprocess, forward and
    postprocess, then the op's own handling of masked rows."""
    rt = site_runtime(site)
    if reference:
        assert has_reference(rt.impl), "verify asks for the definition of sites that have one"
    else:
        assert rt.traced, "trace_training_sites chose this site"
    return _run_site(q, k, v, mask, site, variant, metadata, reference=reference)


def has_reference(impl: AttentionImpl) -> bool:
    """Whether `impl` defines what its sparse output should be (`AttentionImpl.reference`)."""
    return callable(getattr(impl, "reference", None))


def _run_site(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    site: int,
    variant: int,
    metadata: list[torch.Tensor],
    *,
    reference: bool = False,
    own_output: bool = False,
) -> torch.Tensor:
    """The site's impl on its inputs, then eager's values where the backend's may differ (rows
    with no key, overflowed additive masks). `own_output`: the caller runs on real tensors with
    no autograd or trace watching (the op's body), so the output may be written in place."""
    rt = site_runtime(site)
    md = _metadata_for(rt, mask, variant, metadata)
    if rt.tokens_permuted:  # (a fresh object per call: `_metadata_for` rebuilds it)
        object.__setattr__(md, "tokens_permuted", True)
    impl = rt.impl
    expected = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    # FastVideo stacks q, k and v for preprocess_qkv, so it calls it only when their shapes
    # agree; an impl that takes them one by one (a token reorder) needs only the same tokens:
    # GQA's k and v have fewer heads, and skipping the reorder there would run it on q, k, v in
    # the wrong token order
    if impl.stacked_preprocess:
        reorder = q.shape == k.shape == v.shape
    else:
        reorder = q.shape[:2] == k.shape[:2] == v.shape[:2]
    if reference:  # it takes and gives the site's own token order
        out = impl.reference(q, k, v, md)  # type: ignore[attr-defined]
    else:
        qp, kp, vp = q, k, v  # what the impl works on; the masked-row fixes below take the site's
        if reorder and rt.preprocess:
            if impl.stacked_preprocess:
                qp, kp, vp = impl.preprocess_qkv(torch.cat([q, k, v], dim=0), md).chunk(3, dim=0)
            else:
                qp, kp, vp = (impl.preprocess_qkv(x, md) for x in (q, k, v))
        out = impl.forward(qp, kp, vp, md)
        if reorder and rt.postprocess:
            out = impl.postprocess_output(out, md)
    if tuple(out.shape) != expected:
        raise FvCompileError(
            f"attention backend {rt.backend} returned shape {tuple(out.shape)}, expected "
            f"{expected} ([batch, seq, heads, head_dim])"
        )
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    # An SDPA call the model made, run by SDPA again, gives its fully masked rows whatever SDPA's
    # kernel does (zeros on the CPU and in the math kernel, cuDNN differs): leave them be.
    sdpa_again = rt.empty_rows == "zero" and rt.backend == "TORCH_SDPA"
    if rt.empty_rows is not None and mask is not None and not sdpa_again:
        out = _eager_empty_rows(out, v, mask, rt, inputs=(q, k, v, mask) if own_output else None)
    if mask is not None and mask.is_floating_point() and not sdpa_again:
        out = _eager_overflowed_rows(out, v, mask, rt.causal)
    return out.contiguous()


# Logits below this overflow to -inf once a kernel scales them by log2(e) for exp2.
_EXP2_OVERFLOW = -torch.finfo(torch.float32).max / math.log2(math.e)


def _eager_overflowed_rows(
    out: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Rows whose every additive mask value is finite but below -finfo(float32).max / log2(e)
    (a `finfo.min` padding mask blocking a whole row) get what eager gives them: eager adds the
    mask to logits far below half its ulp (2e31), so its weights are softmax(mask row) (the mean
    of v for one fill); fused kernels (SDPA's on CUDA, measured on the H200) scale the logits by
    log2(e) first, overflow to -inf and return zeros. One `[..., Sq|1, Sk] @ v` product: cheap
    for key masks, a second value product for masks over queries."""
    m = mask.float()
    while m.dim() < 4:  # broadcastable to [B, H, Sq, Sk]
        m = m.unsqueeze(0)
    if causal:
        keys = torch.arange(m.shape[-1], device=m.device)
        later = keys[None, :] > torch.arange(out.shape[1], device=m.device)[:, None]
        m = m.masked_fill(later, float("-inf"))
    heads, kv_heads = out.shape[2], v.shape[2]
    m = m.expand(out.shape[0], heads, m.shape[-2], v.shape[1])
    overflowed = (m < _EXP2_OVERFLOW).all(-1, keepdim=True) & (m > float("-inf")).any(
        -1, keepdim=True
    )  # [B, H, Sq|1, 1]
    vh = v.transpose(1, 2).float()  # [B, Hk, Sk, Dv]
    if heads != kv_heads:
        vh = vh.repeat_interleave(heads // kv_heads, 1)
    eager = m.softmax(-1) @ vh  # [B, H, Sq|1, Dv]
    return torch.where(overflowed.transpose(1, 2), eager.transpose(1, 2).to(out.dtype), out)


def _rows_with_a_key(mask: torch.Tensor, causal: bool, q_len: int) -> torch.Tensor:
    """`[B|1, H|1, Sq|1]`: whether a query row attends at least one key under `mask` (boolean,
    True = attend, or additive: -inf = blocked) and, if `causal`, the top-left causal mask."""
    attend = mask if mask.dtype == torch.bool else mask != float("-inf")
    if not causal:
        return attend.any(-1)
    rows = torch.arange(q_len, device=mask.device)
    if attend.shape[-2] == 1:  # the same keys for every query: row i sees keys 0..i
        seen = attend[..., 0, :].cumsum(-1, dtype=torch.int32) > 0
        return seen.index_select(-1, rows.clamp(max=attend.shape[-1] - 1))
    keys = torch.arange(attend.shape[-1], device=mask.device)
    return (attend & (keys[None, :] <= rows[:, None])).any(-1)


def _eager_empty_rows(
    out: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    rt: SiteRuntime,
    inputs: tuple[torch.Tensor | None, ...] | None = None,
) -> torch.Tensor:
    """Give rows whose every key is blocked what eager gives them, whatever the backend did:
    0 (SDPA), NaN (softmax of -inf logits) or the mean of v (softmax of one finite fill).

    With `inputs` (the op's body: real tensors, no autograd or trace watching), where emptiness
    is per batch element (a key padding mask, no causal mask) and `out` shares no storage with
    them, only the empty elements' rows are written, in place (`kernels/empty_batches.py`).
    Elsewhere (traced training sites, `verify`'s definition) one `torch.where`, which autograd
    and tracing see."""
    has_key = _rows_with_a_key(mask, rt.causal, out.shape[1]).transpose(1, 2).unsqueeze(-1)
    if rt.empty_rows == "zero":
        fallback = out.new_zeros(())
    elif rt.empty_rows == "nan":
        fallback = out.new_full((), float("nan"))
    else:
        mean = v.float().mean(1, keepdim=True).to(out.dtype)  # [B, 1, Hk, Dv]
        fallback = mean.repeat_interleave(out.shape[2] // v.shape[2], dim=2)
    b, _, h, dv = out.shape
    if inputs is not None and has_key.shape[1:] == (1, 1, 1) and _fill_kernel_runs(out):
        out = out.contiguous()  # the op returns it contiguous anyway
        mine = out.untyped_storage().data_ptr()
        if all(x is None or x.untyped_storage().data_ptr() != mine for x in inputs):
            from fv_compile.backends.kernels.empty_batches import fill_empty_batches

            empty = ~has_key.reshape(-1).expand(b)
            return fill_empty_batches(out, empty, fallback.expand(b, 1, h, dv)[:, 0])
    return torch.where(has_key, out, fallback)


def _fill_kernel_runs(out: torch.Tensor) -> bool:
    """Whether `fill_empty_batches` (a Triton kernel) runs on `out`: CUDA or the interpreter,
    Triton installed, fewer than 2**31 elements a batch element."""
    from fv_compile.backends.kernels import interpreting

    if not (out.is_cuda or interpreting()) or out.numel() == 0:
        return False
    return out.numel() // out.shape[0] < 2**31 and importlib.util.find_spec("triton") is not None


@attention.register_fake
def _attention_fake(q, k, v, mask, site, variant, metadata):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def _blocked_logits(
    qh: torch.Tensor, kh: torch.Tensor, mask: torch.Tensor | None, rt: SiteRuntime, row0: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`[B, H, rows, Sk]` logits of the query rows `row0...` (`qh`, `[B, H, rows, D]`, and `mask`
    cut to those rows) as the site's eager code makes them (scale, causal, mask; `kh` with its
    heads repeated for GQA), and where a fill replaced them (their gradient is cut there)."""
    scores = rt.scale * (qh @ kh.transpose(-2, -1))
    filled = None
    if rt.causal:
        keys = torch.arange(scores.shape[-1], device=qh.device)
        rows = torch.arange(row0, row0 + scores.shape[-2], device=qh.device)
        filled = keys[None, :] > rows[:, None]
        scores = scores.masked_fill(filled, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            blocked = rt.fill if rt.fill is not None else float("-inf")
            scores = scores.masked_fill(~mask, blocked)
            filled = ~mask if filled is None else filled | ~mask
        else:
            scores = scores + mask.to(scores.dtype)
    return scores, filled


# The float32 recomputation works on blocks of query rows whose `[B, H, rows, Sk]` weights hold
# at most this many elements (256 MiB each of the few it keeps at once): any length trains
# without the whole score matrix in memory, and short sequences stay one block.
_BACKWARD_BLOCK_ELEMENTS = 1 << 26


@torch.library.custom_op("fv_compile::attention_backward", mutates_args=())
def attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    site: int,
    mask_grad: bool,
) -> list[torch.Tensor]:
    """`[dq, dk, dv]` (and `dmask`, summed to the mask's broadcast shape, when `mask_grad`) of the
    site's dense attention, by recomputation.

    Half-precision CUDA sites with no mask take SDPA's flash-attention backward (memory linear
    in the length, the rounding of eager's own fused attention). Everything else is recomputed in
    float32 at least, a block of query rows at a time: exact for dense backends, with eager's
    gradients on blocked rows (a fill passes no gradient to the logits it replaced)."""
    rt = site_runtime(site)
    if not rt.differentiable:
        raise NotSupportedByBackend(
            f"backend {rt.backend} is forward-only: run the compiled model under torch.no_grad() "
            "or choose a dense backend (TORCH_SDPA, TRITON_ATTN, FLASH_ATTN) to train; a backend "
            "whose output is dense attention declares `differentiable = True`"
        )
    if mask is None and _flash_backward_applies(q, k, v, rt):
        return _flash_backward(grad, q, k, v, rt)
    return _blockwise_backward(grad, q, k, v, mask, rt, mask_grad)


def _flash_backward_applies(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rt: SiteRuntime
) -> bool:
    d = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.dtype == k.dtype == v.dtype
        and v.shape[-1] == d
        and d % 8 == 0
        and d <= 256
        and not (rt.causal and q.shape[1] != k.shape[1])  # SDPA's causal corner would differ
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(q.device)[0] >= 8
        and not torch.are_deterministic_algorithms_enabled()  # its dq sums with atomics
    )


def _flash_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rt: SiteRuntime
) -> list[torch.Tensor]:
    heads = q.shape[2]
    qh, go = (_unit_stride_last(x.transpose(1, 2)) for x in (q, grad))
    kh, vh = (_unit_stride_last(_with_heads(x.transpose(1, 2), heads)) for x in (k, v))
    fwd = torch.ops.aten._scaled_dot_product_flash_attention(
        qh, kh, vh, 0.0, rt.causal, False, scale=rt.scale
    )
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset = fwd[:8]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        go,
        qh,
        kh,
        vh,
        out,
        lse,
        cum_q,
        cum_k,
        max_q,
        max_k,
        0.0,
        rt.causal,
        seed,
        offset,
        scale=rt.scale,
    )
    return [_to_bshd(dq, q), _to_bshd(dk, k), _to_bshd(dv, v)]


def _with_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, Hk, S, D]` with each kv head repeated for its query heads (GQA); itself, not a copy,
    when the heads already match."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def _unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _to_bshd(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A `[B, H, S, D]` gradient in the layout, heads and dtype of `like` (`[B, S, Hk, D]`): under
    GQA each kv head's gradient sums over its query heads."""
    heads = like.shape[2]
    if g.shape[1] != heads:
        g = g.unflatten(1, (heads, g.shape[1] // heads)).sum(2)
    return g.transpose(1, 2).to(like.dtype).contiguous()


def _query_rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """The block `rows` of a `[..., Sq|1, Sk|1]` tensor (all of it where it broadcasts)."""
    return x if x.shape[-2] == 1 else x[..., rows, :]


def _blockwise_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    rt: SiteRuntime,
    mask_grad: bool,
) -> list[torch.Tensor]:
    dt = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, go = (x.to(dt) for x in (q, k, v, grad))
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    kh, vh = (_with_heads(x.transpose(1, 2), h) for x in (kf, vf))
    m4 = None if mask is None else mask[(None,) * (4 - mask.dim())]
    has_key = None
    if rt.empty_rows == "zero" and m4 is not None:  # SDPA: a row with no key gives zeros
        has_key = _rows_with_a_key(m4, rt.causal, sq).unsqueeze(-1)  # [B|1, H|1, Sq|1, 1]
    rows_per_block = max(1, _BACKWARD_BLOCK_ELEMENTS // max(1, b * h * sk))
    dq_blocks, dmask_blocks = [], []
    dk = kh.new_zeros(kh.shape)
    dv = vh.new_zeros(vh.shape)
    for r0 in range(0, sq, rows_per_block):
        rows = slice(r0, min(sq, r0 + rows_per_block))
        qb = qf[:, rows].transpose(1, 2)
        mb = None if m4 is None else _query_rows(m4, rows)
        scores, filled = _blocked_logits(qb, kh, mb, rt, r0)
        p = scores.softmax(-1)
        del scores  # (a block holds few `[B, H, rows, Sk]` tensors at once: ds reuses dp)
        if has_key is not None:
            p = torch.where(_query_rows(has_key, rows), p, 0.0)
        gob = go[:, rows].transpose(1, 2)
        dv += p.transpose(-2, -1) @ gob
        dp = gob @ vh.transpose(-2, -1)
        ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)
        del p, dp
        if mask_grad:
            assert m4 is not None
            dims = [d for d in range(4) if m4.shape[d] == 1 and ds.shape[d] != 1]
            dmask_blocks.append(ds.sum(dims, keepdim=True) if dims else ds.clone())
        if filled is not None:
            ds.masked_fill_(filled, 0.0)
        dq_blocks.append(rt.scale * (ds @ kh))
        dk += rt.scale * (ds.transpose(-2, -1) @ qb)
    out = [_to_bshd(torch.cat(dq_blocks, 2), q), _to_bshd(dk, k), _to_bshd(dv, v)]
    if mask_grad:
        assert mask is not None and m4 is not None
        # a mask shared by every query row gets the sum over the blocks
        shared = m4.shape[2] == 1
        dmask = torch.stack(dmask_blocks).sum(0) if shared else torch.cat(dmask_blocks, 2)
        out.append(dmask.reshape(mask.shape).to(mask.dtype).contiguous())
    return out


@attention_backward.register_fake
def _attention_backward_fake(grad, q, k, v, mask, site, mask_grad):
    # contiguous, as the real kernel returns them (empty_like would keep q's strides)
    out = [x.new_empty(x.shape) for x in (q, k, v)]
    if mask_grad:
        out.append(mask.new_empty(mask.shape))
    return out


@torch.library.custom_op("fv_compile::attention_impl_backward", mutates_args=())
def attention_impl_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    site: int,
    variant: int,
    metadata: list[torch.Tensor],
) -> list[torch.Tensor]:
    """`[dq, dk, dv]` from the site impl's own `backward` (`AttentionImpl.backward`), given the
    metadata the forward was called with: for backends whose output is not dense attention."""
    rt = site_runtime(site)
    md = _metadata_for(rt, mask, variant, metadata)
    if rt.tokens_permuted:
        object.__setattr__(md, "tokens_permuted", True)
    grads = rt.impl.backward(grad, q, k, v, md)
    return [g.to(x.dtype).contiguous() for g, x in zip(grads, (q, k, v))]


@attention_impl_backward.register_fake
def _attention_impl_backward_fake(grad, q, k, v, mask, site, variant, metadata):
    return [x.new_empty(x.shape) for x in (q, k, v)]


def _setup_context(ctx, inputs, output):
    q, k, v, mask, site, variant, metadata = inputs
    ctx.site = site
    ctx.n_metadata = len(metadata)
    ctx.own_backward = site_runtime(site).own_backward
    if ctx.own_backward:  # the impl's backward rebuilds the forward's metadata
        ctx.variant = variant
        ctx.save_for_backward(q, k, v, mask, *metadata)
    else:
        ctx.save_for_backward(q, k, v, mask)


def _backward(ctx, grad):
    if ctx.own_backward:
        q, k, v, mask, *metadata = ctx.saved_tensors
        if mask is not None and ctx.needs_input_grad[3]:
            raise NotSupportedByBackend(
                f"backend {site_runtime(ctx.site).backend} computes no gradient for a learned "
                "attention mask: detach the mask, or choose a dense backend (TORCH_SDPA) to train it"
            )
        grads = torch.ops.fv_compile.attention_impl_backward(
            grad, q, k, v, mask, ctx.site, ctx.variant, metadata
        )
        return grads[0], grads[1], grads[2], None, None, None, [None] * ctx.n_metadata
    q, k, v, mask = ctx.saved_tensors
    mask_grad = bool(mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3])
    grads = torch.ops.fv_compile.attention_backward(grad, q, k, v, mask, ctx.site, mask_grad)
    dmask = grads[3] if mask_grad else None
    return grads[0], grads[1], grads[2], dmask, None, None, [None] * ctx.n_metadata


attention.register_autograd(_backward, setup_context=_setup_context)
