"""The op every attention site is rewritten to, and the registries it resolves at run time.

`fv_compile::attention(q, k, v, mask, site, variant, metadata)` is a `torch.library.custom_op`
with a fake implementation: opaque to Inductor (no graph break, no retracing of backend code),
CUDA-graph safe (everything that changes per step arrives as a tensor). `site` and `variant` are
constants baked into the graph: `site` picks the `AttentionImpl` built for that site at compile
time, `variant` the layout that rebuilds the backend's metadata object from the `metadata` tensors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from fv_compile.backends.abstract import AttentionImpl, AttentionMetadata
from fv_compile.errors import FvCompileError
from fv_compile.metadata import MetadataLayout


@dataclass
class SiteRuntime:
    """What the op needs to run one site."""

    impl: AttentionImpl
    backend: str
    scale: float
    causal: bool
    differentiable: bool  # backward by dense recomputation is exact for this backend
    preprocess: bool  # the impl overrides preprocess_qkv
    postprocess: bool  # the impl overrides postprocess_output


@dataclass
class SiteMetadata(AttentionMetadata):
    """What a backend without a metadata builder receives: the site's own mask, if any."""

    attn_mask: torch.Tensor | None = None


_SITES: dict[int, SiteRuntime] = {}
_VARIANTS: dict[int, dict[str, MetadataLayout]] = {0: {}}
_site_ids = itertools.count(1)
_variant_ids = itertools.count(1)


def register_site(impl: AttentionImpl, backend: str, scale: float, causal: bool, exact: bool) -> int:
    cls = type(impl)
    rt = SiteRuntime(
        impl=impl,
        backend=backend,
        scale=scale,
        causal=causal,
        differentiable=exact,
        preprocess=cls.preprocess_qkv is not AttentionImpl.preprocess_qkv,
        postprocess=cls.postprocess_output is not AttentionImpl.postprocess_output,
    )
    sid = next(_site_ids)
    _SITES[sid] = rt
    return sid


def register_variant(layouts: dict[str, MetadataLayout]) -> int:
    vid = next(_variant_ids)
    _VARIANTS[vid] = dict(layouts)
    return vid


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
    rt = _SITES[site]
    md = _metadata_for(rt, mask, variant, metadata)
    impl = rt.impl
    expected = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    stacked = q.shape == k.shape == v.shape
    if stacked and rt.preprocess:
        if impl.stacked_preprocess:
            q, k, v = impl.preprocess_qkv(torch.cat([q, k, v], dim=0), md).chunk(3, dim=0)
        else:
            q, k, v = (impl.preprocess_qkv(x, md) for x in (q, k, v))
    out = impl.forward(q, k, v, md)
    if stacked and rt.postprocess:
        out = impl.postprocess_output(out, md)
    if tuple(out.shape) != expected:
        raise RuntimeError(
            f"attention backend {rt.backend} returned shape {tuple(out.shape)}, expected "
            f"{expected} ([batch, seq, heads, head_dim])"
        )
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    return out.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, mask, site, variant, metadata):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


@torch.library.custom_op("fv_compile::attention_backward", mutates_args=())
def attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    site: int,
) -> list[torch.Tensor]:
    """Gradients of dense attention by recomputation in float32: exact for dense backends.

    Materialises the `[B, H, Sq, Sk]` weights, so it suits fine-tuning at moderate lengths."""
    rt = _SITES[site]
    if not rt.differentiable:
        raise NotImplementedError(
            f"backend {rt.backend} is forward-only: run the compiled model under torch.no_grad() "
            "or choose a dense backend (TORCH_SDPA, TRITON_ATTN, FLASH_ATTN) to train"
        )
    h, hk = q.shape[2], k.shape[2]
    qf, kf, vf, go = (x.transpose(1, 2).float() for x in (q, k, v, grad))
    kf, vf = kf.repeat_interleave(h // hk, 1), vf.repeat_interleave(h // hk, 1)
    scores = rt.scale * qf @ kf.transpose(-2, -1)
    if rt.causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    p = scores.softmax(-1)
    dv = p.transpose(-2, -1) @ go
    dp = go @ vf.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = rt.scale * ds @ kf
    dk = rt.scale * ds.transpose(-2, -1) @ qf

    def to_bshd(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        heads = like.shape[2]
        if g.shape[1] != heads:  # GQA: each kv head's gradient sums over its query heads
            g = g.unflatten(1, (heads, g.shape[1] // heads)).sum(2)
        return g.transpose(1, 2).to(like.dtype).contiguous()

    return [to_bshd(dq, q), to_bshd(dk, k), to_bshd(dv, v)]


@attention_backward.register_fake
def _attention_backward_fake(grad, q, k, v, mask, site):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _setup_context(ctx, inputs, output):
    q, k, v, mask, site, _variant, _metadata = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.site = site
    ctx.n_metadata = len(_metadata)


def _backward(ctx, grad):
    q, k, v, mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.fv_compile.attention_backward(grad, q, k, v, mask, ctx.site)
    return dq, dk, dv, None, None, None, [None] * ctx.n_metadata


attention.register_autograd(_backward, setup_context=_setup_context)
