"""VIDEO_SPARSE_ATTN: trainable coarse-to-fine video sparse attention (VSA, arXiv 2505.13389),
for video self-attention and the video part of joint attention.

Sliding tiles fix the pattern in advance; VSA picks it from the data at every call. Tokens are
grouped into (4, 4, 4) cubes of 64 (edge cubes partial: any resolution). A coarse stage attends
cube to cube between the cubes' mean q, k, v; its scores rank the key cubes of each query cube,
and the fine stage attends, token by token, only the `topk` best of them (FastVideo's
`topk = max(1, ceil((1 - sparsity) * n_cubes))`), plus every text token of joint attention,
which in turn attends everything. The output is the fine stage's, plus the coarse output times
a gate where the caller passes one (FastVideo's `gate_compress`).

What the graph pass wires: fine only (a site found in a graph has no gate). The gate exists at
the impl's API (`forward(q, k, v, gate_compress, attn_metadata)`, FastVideo's signature) and at
the op's (`vsa_ops.video_sparse_attention`), both differentiable in it.

The sparsity comes from `ForwardBatch.VSA_sparsity` (else `FastVideoArgs.VSA_sparsity`), zero
for the first `FastVideoArgs.vsa_dense_steps` steps. It reaches the graph as a tensor (`topk`),
so a whole schedule runs on one compiled graph; at sparsity 0 every cube is kept and the output
is dense attention exactly (with no gate).

Training: the op's backward is this impl's own (`backward`): the coarse stage and the top-k
lists are recomputed (cheap), the fine stage runs the block-sparse backward kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from fv_compile.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from fv_compile.backends.kernels import TRITON_HEAD_DIMS
from fv_compile.backends.tiles import (
    Grid,
    at_step,
    check_text_fits,
    dense_step,
    tile_geometry,
    tiles_per_axis,
    token_grid,
)
from fv_compile.backends.vsa_ops import (
    BLOCK,
    coarse_stage,
    top_cube_lists,
    video_sparse_attention,
    vsa_backward,
)
from fv_compile.backends.vsa_reference import CUBE, cube_of_token, topk_cubes
from fv_compile.context import patch_size_of, step_cache
from fv_compile.errors import FvCompileError
from fv_compile.site import AttentionSite


@dataclass
class VideoSparseMetadata(AttentionMetadata):
    grid: Grid = (0, 0, 0)  # token grid (T, H, W)
    tile_index: torch.Tensor | None = None  # long [n_cubes * 64]: raster token per slot
    untile_index: torch.Tensor | None = None  # long [T*H*W]: slot of each raster token
    block_valid: torch.Tensor | None = None  # int32 [n_cubes]: tokens per cube
    topk: torch.Tensor | None = None  # int32 [1]: key cubes each query cube keeps


def step_sparsity(step: int, forward_batch: Any, fastvideo_args: Any) -> float:
    """This step's sparsity: 0 for the first `vsa_dense_steps` steps, else the forward batch's
    `VSA_sparsity` (FastVideo's training loop sets it per step), else the args'. Either may be a
    per-step sequence (its last value holds for the steps after it)."""
    if dense_step(step, fastvideo_args, "vsa_dense_steps"):
        return 0.0
    value: Any = getattr(forward_batch, "VSA_sparsity", None)
    if value is None:
        value = getattr(fastvideo_args, "VSA_sparsity", 0.0)
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = at_step(value, step, "VSA_sparsity")
    try:
        sparsity = float(value)
    except (TypeError, ValueError):
        raise FvCompileError(
            f"VSA_sparsity must be a number in [0, 1] (or one per step), got {value!r}"
        ) from None
    if not 0.0 <= sparsity <= 1.0:
        raise FvCompileError(
            f"VSA_sparsity={sparsity} is outside [0, 1]: it is the fraction of key cubes skipped "
            "(0 = dense, 0.9 keeps a tenth)"
        )
    return sparsity


class VideoSparseMetadataBuilder(AttentionMetadataBuilder[VideoSparseMetadata]):
    def build(self, current_timestep, forward_batch, fastvideo_args) -> VideoSparseMetadata:
        grid = token_grid(
            getattr(forward_batch, "raw_latent_shape", None),
            patch_size_of(fastvideo_args),
            "VIDEO_SPARSE_ATTN",
        )
        sparsity = step_sparsity(int(current_timestep), forward_batch, fastvideo_args)
        tile_index, untile_index, block_valid = tile_geometry(grid, CUBE)  # lru-cached per grid
        keep = topk_cubes(sparsity, math.prod(tiles_per_axis(grid, CUBE)))
        return VideoSparseMetadata(
            current_timestep,
            grid,
            tile_index,
            untile_index,
            block_valid,
            torch.tensor([keep], dtype=torch.int32),
        )


def _layout(tensor: torch.Tensor | None) -> torch.Tensor:
    assert tensor is not None, "VIDEO_SPARSE_ATTN metadata holds its cube layout"
    return tensor


class VideoSparseAttentionImpl(AttentionImpl[VideoSparseMetadata]):
    """VSA over one site's tokens: the video grid (from the forward context's latent shape) and,
    for joint attention, the text segment the site recorded. Built without a site (FastVideo's
    layer construction), it knows no text unless told (`joint_text_len=`, `joint_text_first=`);
    a site whose length is not the grid plus its text is an error, never a guess."""

    stacked_preprocess = False  # a token reorder: applied to q, k and v (and a gate) alike

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        softmax_scale: float,
        causal: bool = False,
        num_kv_heads: int | None = None,
        prefix: str = "",
        site: AttentionSite | None = None,
        joint_text_len: int | None = None,
        joint_text_first: bool | None = None,
        **extra_impl_args: Any,
    ) -> None:
        if causal:
            raise FvCompileError(
                "VIDEO_SPARSE_ATTN is non-causal: run causal attention on a dense backend"
            )
        self.scale = float(softmax_scale)
        self.prefix = prefix
        if site is not None:
            joint = site.role == "joint"
            self.q_len: int | None = site.q_len
            self.text_len = int(site.joint_text_len or 0) if joint else 0
            self.text_first = bool(joint and site.joint_text_first)
        else:
            if joint_text_len is not None and (
                isinstance(joint_text_len, bool) or int(joint_text_len) < 0
            ):
                raise FvCompileError(
                    f"joint_text_len must be a token count >= 0, got {joint_text_len!r}"
                )
            self.q_len = None
            self.text_len = int(joint_text_len or 0)
            self.text_first = bool(joint_text_first)

    def _check_length(self, md: VideoSparseMetadata, length: int) -> None:
        n = math.prod(md.grid)
        total = self.q_len if self.q_len is not None else length
        if total != n + self.text_len or length != total:
            if self.q_len is not None and length == total:  # the split fv_compile chose
                check_text_fits(
                    f"VIDEO_SPARSE_ATTN at {self.prefix or 'a site'}", total, self.text_len, md.grid
                )
            raise FvCompileError(
                f"VIDEO_SPARSE_ATTN at {self.prefix or 'a site'}: {length} tokens, but the video "
                f"grid {md.grid} holds {n} and the site has {self.text_len} text tokens. Pass this "
                "call's latent: forward_batch=ForwardBatch(raw_latent_shape=latent.shape) ([B, C, "
                "T, H, W], before patchify) with FastVideoArgs(patch_size=...); an impl built "
                "without a site is told its text: joint_text_len=<text tokens>"
            )

    # -- token order: raster -> cubes (+ text in whole blocks) and back ---------------------------

    def _order(self, md: VideoSparseMetadata):
        """`(gather, scatter, block_valid)`: the site row of every slot (padding slots read a
        real row; nothing uses them), the slot of every site row, and tokens per block (cubes,
        then text blocks). Built once per step (the forward context's step cache)."""
        tile_index = _layout(md.tile_index)
        cache = step_cache()
        key = ("VIDEO_SPARSE_ATTN", "order", self.text_len, self.text_first)
        hit = None if cache is None else cache.get(key)
        capturing = tile_index.is_cuda and torch.cuda.is_current_stream_capturing()
        if hit is not None and hit[0] is tile_index and not capturing:
            return hit[1]
        order = self._build_order(md)
        if cache is not None and not torch.compiler.is_compiling():  # (a trace's are not reused)
            cache[key] = (tile_index, order)
        return order

    def _build_order(self, md: VideoSparseMetadata):
        tile_index, untile_index = _layout(md.tile_index), _layout(md.untile_index)
        valid = _layout(md.block_valid)
        n, slots, text = math.prod(md.grid), tile_index.shape[0], self.text_len
        dev = tile_index.device
        video_at, text_at = (text, 0) if self.text_first else (0, n)
        n_text = -(-text // BLOCK)
        gather = torch.cat(
            [
                torch.where(tile_index < n, tile_index + video_at, video_at),
                torch.arange(text, device=dev) + text_at,
                torch.full((n_text * BLOCK - text,), video_at, dtype=torch.long, device=dev),
            ]
        )
        words = torch.arange(slots, slots + text, device=dev)
        scatter = torch.cat([words, untile_index] if self.text_first else [untile_index, words])
        text_valid = (text - torch.arange(n_text, device=dev) * BLOCK).clamp(0, BLOCK)
        return gather, scatter, torch.cat([valid, text_valid.to(torch.int32)])

    def preprocess_qkv(self, qkv: torch.Tensor, attn_metadata: VideoSparseMetadata) -> torch.Tensor:
        self._check_length(attn_metadata, qkv.shape[1])
        return qkv.index_select(1, self._order(attn_metadata)[0])

    def postprocess_output(
        self, output: torch.Tensor, attn_metadata: VideoSparseMetadata
    ) -> torch.Tensor:
        return output.index_select(1, self._order(attn_metadata)[1])

    # -- attention ------------------------------------------------------------------------------

    # FastVideo's VSA impl breaks the base signature the same way (a gate before the metadata)
    def forward(self, query, key, value, gate_compress, attn_metadata=None):  # type: ignore[override]
        """`forward(q, k, v, attn_metadata)` (fine only) or FastVideo's
        `forward(q, k, v, gate_compress, attn_metadata)`, on tensors preprocessed into cube
        order; differentiable in all of them."""
        if attn_metadata is None:
            gate, md = None, gate_compress
        else:
            gate, md = gate_compress, attn_metadata
        if getattr(md, "attn_mask", None) is not None:
            raise ValueError("VIDEO_SPARSE_ATTN takes no attention mask")
        _, _, valid = self._order(md)
        if query.shape[1] != valid.shape[0] * BLOCK:
            raise FvCompileError(
                f"VIDEO_SPARSE_ATTN at {self.prefix or 'a site'}: forward takes q, k, v in cube "
                f"order ({valid.shape[0] * BLOCK} slots), got {query.shape[1]} tokens: run "
                "preprocess_qkv on them first (fv_compile's op does)"
            )
        key, value = _repeat_kv(key, value, query.shape[2])
        n_video = _layout(md.block_valid).shape[0]
        return video_sparse_attention(
            query, key, value, gate, valid, _layout(md.topk), n_video, self.scale
        )

    def reference(self, query, key, value, attn_metadata):
        """The fine-only site as VSA defines it, on the site's own token order, in float32: each
        video query attends the tokens of the key cubes its cube keeps plus every text token,
        each text query every token. Cubes and their means come from token coordinates
        (`vsa_reference`), not from the cube-major layout the kernels use. The kept cubes are
        those the impl's coarse stage ranked first when they are a top-k of the definition's
        coarse scores to within float rounding (a near-tie may fall either way), else the
        definition's own: a wrong ranking, list, reorder or kernel shows as a difference."""
        md = attn_metadata
        if getattr(md, "attn_mask", None) is not None:
            raise ValueError("VIDEO_SPARSE_ATTN takes no attention mask")
        self._check_length(md, query.shape[1])
        heads = query.shape[2]
        q, (k, v) = query.float(), _repeat_kv(key.float(), value.float(), heads)
        n, text, dev = math.prod(md.grid), self.text_len, q.device
        video_at = text if self.text_first else 0
        cube_id, n_cubes = cube_of_token(md.grid)
        cube_id = cube_id.to(dev)
        count = torch.bincount(cube_id, minlength=n_cubes).clamp(min=1).to(q.dtype)

        def means(x: torch.Tensor) -> torch.Tensor:  # [B, H, C, D]
            video = x[:, video_at : video_at + n]
            sums = video.new_zeros(x.shape[0], n_cubes, *x.shape[2:]).index_add_(1, cube_id, video)
            return (sums / count[None, :, None, None]).transpose(1, 2)

        scores = self.scale * means(q) @ means(k).transpose(-2, -1)  # [B, H, C, C]
        keep = int(_layout(md.topk).reshape(()))
        keep = max(1, min(keep, n_cubes))
        # the impl's ranking, from its own coarse stage on the cube-major tensors
        gather, _, valid = self._order(md)
        qt, kt, vt = (x.index_select(1, gather) for x in (query, *_repeat_kv(key, value, heads)))
        _, impl_scores = coarse_stage(qt, kt, vt, valid, n_cubes, self.scale)
        lists, _ = top_cube_lists(impl_scores, _layout(md.topk), valid.shape[0])
        n_text = valid.shape[0] - n_cubes
        picked = lists.view(*scores.shape[:2], -1, lists.shape[-1])[:, :, :n_cubes]
        picked = picked[..., n_text : n_text + keep].long()
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picked, True)
        own = torch.zeros_like(chosen).scatter_(-1, scores.topk(keep, -1).indices, True)
        slack = 1e-4 * (1 + scores.abs().amax(-1))
        lowest = scores.masked_fill(~chosen, float("inf")).amin(-1)
        highest = scores.masked_fill(chosen, float("-inf")).amax(-1)
        kept = torch.where((lowest >= highest - slack)[..., None], chosen, own)  # [B, H, C, C]

        total = q.shape[1]
        cube_at = torch.full((total,), -1, dtype=torch.long, device=dev)  # -1: a text token
        cube_at[video_at : video_at + n] = cube_id

        def attend(qr: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, allowed: torch.Tensor):
            s = (qr @ kh.T) * self.scale
            return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vh

        # under autograd (`verify(backward=True)`), each block of rows is recomputed for the
        # backward rather than kept: a video site's [rows, S] weights would not all fit
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
        run = functools.partial(checkpoint, attend, use_reentrant=False) if grad else attend
        key_cube, key_is_text = cube_at.clamp(min=0), cube_at < 0
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=dev)
        rows_at_once = max(1, 2**26 // total)  # a [rows, S] score block of <= 256 MB
        for b in range(q.shape[0]):
            for h in range(heads):
                for start in range(0, total, rows_at_once):
                    rows = torch.arange(start, min(start + rows_at_once, total), device=dev)
                    rc = cube_at[rows]
                    allowed = kept[b, h][rc.clamp(min=0)][:, key_cube]
                    allowed |= (rc < 0)[:, None] | key_is_text[None, :]  # text: all open
                    out[b, rows, h] = run(q[b, rows, h], k[b, :, h], v[b, :, h], allowed)
        return out

    def backward(self, grad, query, key, value, attn_metadata):
        """`[dq, dk, dv]` of the fine-only site, in the site's token order (what fv_compile's op
        hands its backward: the site's own q, k, v, not preprocessed)."""
        md = attn_metadata
        self._check_length(md, query.shape[1])
        gather, scatter, valid = self._order(md)
        q, k, v, g = (x.index_select(1, gather) for x in (query, key, value, grad))
        kv_heads = k.shape[2]
        k, v = _repeat_kv(k, v, q.shape[2])
        n_video = _layout(md.block_valid).shape[0]
        dq, dk, dv = vsa_backward(g, q, k, v, None, valid, _layout(md.topk), n_video, self.scale)
        if kv_heads != q.shape[2]:  # GQA: each kv head's gradient sums over its query heads
            group = q.shape[2] // kv_heads
            dk, dv = (x.unflatten(2, (kv_heads, group)).sum(3) for x in (dk, dv))
        return [x.index_select(1, scatter) for x in (dq, dk, dv)]


def _repeat_kv(key: torch.Tensor, value: torch.Tensor, heads: int):
    """k, v with their heads repeated to the query's (GQA): VSA ranks cubes per query head."""
    if key.shape[2] == heads:
        return key, value
    group = heads // key.shape[2]
    return key.repeat_interleave(group, 2), value.repeat_interleave(group, 2)


class VideoSparseAttentionBackend(AttentionBackend):
    label = "VSA"
    roles = ("self", "joint")  # video self-attention, and the video part of joint attention
    mask_kinds = ()
    causal = False
    # its output is not dense attention: fv_compile's dense backward would be wrong for it; it
    # trains through its impl's own `backward`
    differentiable = False

    @staticmethod
    def get_name() -> str:
        return "VIDEO_SPARSE_ATTN"

    @staticmethod
    def get_impl_cls() -> type[VideoSparseAttentionImpl]:
        return VideoSparseAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[VideoSparseMetadata]:
        return VideoSparseMetadata

    @staticmethod
    def get_builder_cls() -> type[VideoSparseMetadataBuilder]:
        return VideoSparseMetadataBuilder

    @staticmethod
    def traced_in_training(site: AttentionSite) -> bool:
        """Always: the cube reorder is two index_selects, the attention the VSA op whose
        backward reuses the forward's lists and row statistics; padding slots (read by the
        gather, dropped by the scatter) get exactly zero gradient from both stages."""
        return True

    @staticmethod
    def supports(site: AttentionSite) -> str | None:
        if site.device.startswith("cuda") and site.head_dim not in TRITON_HEAD_DIMS:
            supported = " and ".join(map(str, TRITON_HEAD_DIMS))
            return f"head dim {site.head_dim} (the kernel supports {supported})"
        return None
