"""SLIDING_TILE_ATTN: sliding tile attention (STA, arXiv 2502.04507) for video self-attention.

Video tokens are regrouped into 3D tiles (FastVideo's `(6, 8, 8)` by default); each query tile
attends to the key tiles of a window centred on it (shifted at the borders so every query tile
sees as many), plus every text token of joint attention, which in turn attends to everything.
Windows may differ per layer, head and denoising step; the first `sta_dense_steps` steps run full
attention. The builder turns all of that into index tensors once per step; the kernel then only
visits listed tiles.

Metadata tensors (graph inputs): tile gather/scatter indices, valid tokens per tile, and per
(layer, head) key-tile lists for the current step. Static fields (a graph variant each): the token
grid, the tile, whether this step is dense.

When the tile divides the token grid, tile order is a permutation of the video tokens, and the
metadata says so (`token_gather`, `token_scatter`; the backend declares them as its
`token_permutation`): fv_compile may then run the whole stretch of the model between the first and
the last STA site in tile order, when it proves that stretch token-wise, and the sites take their
tokens as they come (`attn_metadata.tokens_permuted`). Dense steps have no order: they run as
traced, with no reordering at all.

This file is the backend as FastVideo's API shapes it: metadata, builder, impl, backend. Its
parts live by job beside it: `tiles.py` (tile geometry, windows as key-tile lists),
`sta_windows.py` (the token grid, mask-strategy files, the window schedule per layer, head and
step), `block_lists.py` (text blocks, attention over block lists and its reference), and the
kernels (`kernels/block_sparse_fwd.py`, `kernels/fa4_block_sparse.py`). The dense steps run on
the dense fallback the lowering hands the impl; lists derived once per step live in the forward
context's step cache.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, cast

import torch

from fv_compile.backends._dense import sdpa_bshd
from fv_compile.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from fv_compile.backends.block_lists import block_sparse_attention, with_text_blocks
from fv_compile.backends.kernels import TRITON_HEAD_DIMS
from fv_compile.backends.kernels.fa4_block_sparse import (
    PIECE,
    fa4_block_lists,
    fa4_block_sparse,
    fa4_block_sparse_attention,
    has_ragged_tiles,
)
from fv_compile.backends.kernels.fa4_block_sparse import supports as fa4_supports
from fv_compile.backends.sta_windows import step_windows
from fv_compile.backends.tiles import (
    Grid,
    check_text_fits,
    tile_geometry,
    tiles_per_axis,
    token_grid,
    window_lists,
)
from fv_compile.context import current_layer, patch_size_of, step_cache
from fv_compile.errors import FvCompileError
from fv_compile.site import MASK_KEY_PADDING, AttentionSite


@dataclass
class SlidingTileMetadata(AttentionMetadata):
    grid: Grid = (0, 0, 0)  # token grid (T, H, W)
    tile: Grid = (6, 8, 8)
    dense: bool = False  # this step runs full attention
    text_attends_all: bool = True
    kernel: str = (
        "auto"  # "auto" (flash-attn-4 when it can run, else Triton), "triton", "flash_attn"
    )
    tile_index: torch.Tensor | None = None  # long [n_tiles * volume]
    untile_index: torch.Tensor | None = None  # long [T*H*W]
    block_valid: torch.Tensor | None = None  # int32 [n_tiles]
    kv_indices: torch.Tensor | None = None  # int32 [L, Hm, n_tiles, K]
    kv_counts: torch.Tensor | None = None  # int32 [L, Hm, n_tiles]
    # tile order as a permutation of the T*H*W video tokens, when the tile divides the grid (no
    # padding slots) and `FastVideoArgs.sta_token_order` allows the graph to run in it
    token_gather: torch.Tensor | None = None  # long [T*H*W]: the raster index of each slot
    token_scatter: torch.Tensor | None = None  # long [T*H*W]: the slot of each raster token


_TOKEN_ORDERS = ("auto", "per_site")


def token_order_choice(args: Any) -> str:
    """`FastVideoArgs.sta_token_order`, checked: "auto" lets the graph run in tile order between
    the sites where that is proven sound, "per_site" keeps every site reordering its own."""
    order = str(getattr(args, "sta_token_order", "auto") or "auto")
    if order not in _TOKEN_ORDERS:
        raise FvCompileError(f"sta_token_order={order!r} is not one of {', '.join(_TOKEN_ORDERS)}")
    return order


_KERNELS = ("auto", "triton", "flash_attn")


def sparse_kernel_choice(args: Any) -> str:
    """`FastVideoArgs.sta_kernel`, checked: which kernel runs the sparse steps."""
    kernel = str(getattr(args, "sta_kernel", "auto") or "auto")
    if kernel not in _KERNELS:
        raise FvCompileError(f"sta_kernel={kernel!r} is not one of {', '.join(_KERNELS)}")
    if kernel == "flash_attn" and fa4_block_sparse() is None:
        raise FvCompileError(
            "sta_kernel='flash_attn' needs flash-attn-4 with block sparsity (`pip install "
            "flash-attn-4`); use sta_kernel='auto' to fall back to the Triton kernel"
        )
    return kernel


class SlidingTileMetadataBuilder(AttentionMetadataBuilder[SlidingTileMetadata]):
    def build(self, current_timestep, forward_batch, fastvideo_args) -> SlidingTileMetadata:
        grid = token_grid(
            getattr(forward_batch, "raw_latent_shape", None),
            patch_size_of(fastvideo_args),
            "SLIDING_TILE_ATTN",
        )
        # the user's (t, h, w); a tile of another length fails where it is unpacked
        tile = cast(
            Grid, tuple(int(x) for x in getattr(fastvideo_args, "sta_tile_size", (6, 8, 8)))
        )
        n_tiles = tiles_per_axis(grid, tile)
        text_all = bool(getattr(fastvideo_args, "sta_text_attends_all", True))
        kernel = sparse_kernel_choice(fastvideo_args)
        order = token_order_choice(fastvideo_args)
        windows = step_windows(int(current_timestep), forward_batch, fastvideo_args, n_tiles)
        if windows is None:
            return SlidingTileMetadata(current_timestep, grid, tile, True, text_all, kernel)
        tile_index, untile_index, block_valid = tile_geometry(grid, tile)
        kv_indices, kv_counts = window_lists(n_tiles, windows)
        permutation = order == "auto" and tile_index.shape[0] == untile_index.shape[0]
        return SlidingTileMetadata(
            current_timestep,
            grid,
            tile,
            False,
            text_all,
            kernel,
            tile_index,
            untile_index,
            block_valid,
            kv_indices,
            kv_counts,
            tile_index if permutation else None,
            untile_index if permutation else None,
        )


def layer_index(prefix: str) -> int:
    """The block number in a module path (`blocks.7.attn1.impl` -> 7); 0 when there is none.
    What an impl built without a `layer` (FastVideo's layer construction) goes by."""
    found = re.findall(r"blocks\.(\d+)", prefix)
    return int(found[-1]) if found else 0


class SlidingTileAttentionImpl(AttentionImpl[SlidingTileMetadata]):
    """STA over one site's tokens: the video grid (from the forward context's latent shape) and,
    for joint attention, the text segment the site recorded (`site.joint_text_len`, before or
    after the video). A self-attention site has no text: all its tokens must be the grid's.

    Built without a site (FastVideo's layer construction), the impl knows no text unless it is
    told: `joint_text_len=` (and `joint_text_first=True` when text precedes video). The text
    length is never guessed from how far the input outgrows the grid: a stale, smaller
    `raw_latent_shape` would turn surplus video tokens into "text" and give a wrong answer."""

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
        dense_fallback: AttentionImpl | None = None,
        layer: int | None = None,
        **extra_impl_args: Any,
    ) -> None:
        if causal:
            raise FvCompileError(
                "SLIDING_TILE_ATTN is non-causal: run causal attention on a dense backend"
            )
        self.scale = softmax_scale
        self.prefix = prefix
        # the layer whose windows this site uses: the lowering numbers the model's blocks, list
        # after list (so `single_blocks.0` follows the last of `double_blocks`); else the prefix
        self.layer = layer_index(prefix) if layer is None else int(layer)
        if site is not None:
            joint = site.role == "joint"
            self.q_len: int | None = site.q_len
            self.text_len = int(site.joint_text_len or 0) if joint else 0
            self.text_first = bool(joint and site.joint_text_first)
            self.role: str | None = site.role
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
            self.role = None
        self._seen_len: int | None = None  # the last preprocessed length, when no site says it
        # the impl of this site's full-attention steps: the dense backend the lowering picked for
        # the site (`auto`'s, the measured best), or SDPA when it was built without one
        self._dense = dense_fallback

    def _text_len(self, md: SlidingTileMetadata, length: int | None = None) -> int:
        """The text tokens of this site, after checking that its length is the video grid plus
        them (a site whose length does not add up is an error, never a guess)."""
        n = math.prod(md.grid)
        total = (
            self.q_len
            if self.q_len is not None
            else length
            if length is not None
            else self._seen_len
        )
        if total is not None and total != n + self.text_len:
            if self.role == "joint":
                check_text_fits(
                    f"SLIDING_TILE_ATTN at {self.prefix or 'a site'}", total, self.text_len, md.grid
                )
            raise FvCompileError(self._length_error(md, total, n))
        return self.text_len

    def _length_error(self, md: SlidingTileMetadata, total: int, n: int) -> str:
        at = f"SLIDING_TILE_ATTN at {self.prefix or 'a site'}"
        latent = (
            "pass this call's latent: forward_batch=ForwardBatch(raw_latent_shape=latent.shape) "
            "([B, C, T, H, W], before patchify), with FastVideoArgs(patch_size=...) the DiT's patch size"
        )
        if total < n + self.text_len and self.text_len == 0:
            return (
                f"{at}: {total} tokens, but the video grid {md.grid} holds {n}. Either "
                f"ForwardBatch.raw_latent_shape is not this call's latent ({latent}), or the site is "
                "not video attention (a text encoder's self-attention): route it to a dense backend, "
                "e.g. attention_backend=lambda site: 'SLIDING_TILE_ATTN' if site.q_len >= VIDEO_TOKENS "
                "else 'auto'"
            )
        if self.role == "joint":
            return (
                f"{at}: this joint site has {total} tokens, {self.text_len} of them text, so "
                f"{total - self.text_len} video tokens; but the video grid {md.grid} of "
                f"ForwardBatch.raw_latent_shape holds {n}. The latent shape is stale or wrong: {latent}"
            )
        if self.role is not None:
            return (
                f"{at}: this {self.role}-attention site has {total} tokens, all of them video, but the "
                f"video grid {md.grid} of ForwardBatch.raw_latent_shape holds {n}. The latent shape "
                f"is stale or wrong (a smaller one would leave {total - n} tokens outside the tiles): "
                f"{latent}"
            )
        text = f"{self.text_len} text tokens + " if self.text_len else ""
        return (
            f"{at}: {total} tokens, but the video grid {md.grid} holds {n} ({text}{n} video = "
            f"{n + self.text_len} expected); an impl built without a site treats every token it was "
            "not told is text as video. If ForwardBatch.raw_latent_shape is stale, "
            f"{latent}; if this layer is joint attention, construct the impl with "
            "joint_text_len=<text tokens> (and joint_text_first=True when text comes first)"
        )

    # -- token order: raster -> tile-major (+ text padded to whole blocks) and back -------------
    # Each direction is one gather. Padding slots read a real token: the kernels never use them
    # (padded keys are masked or unlisted, padded query rows are dropped when untiling).

    stacked_preprocess = False  # a token reorder: applied to q, k and v one by one

    def preprocess_qkv(self, qkv: torch.Tensor, attn_metadata: SlidingTileMetadata) -> torch.Tensor:
        md = attn_metadata
        if md.dense:
            return qkv
        self._seen_len = qkv.shape[1]
        gather, _, _, identity = self._token_order(md, qkv.shape[1])
        return qkv if identity else qkv.index_select(1, gather)

    def postprocess_output(
        self, output: torch.Tensor, attn_metadata: SlidingTileMetadata
    ) -> torch.Tensor:
        md = attn_metadata
        if md.dense:
            return output
        _, scatter, _, identity = self._token_order(md)
        return output if identity else output.index_select(1, scatter)

    def _token_order(self, md: SlidingTileMetadata, length: int | None = None):
        """`(gather, scatter, is_token, identity)`: the site's row for every tile-major slot
        (video tiles, then text padded to whole tiles), every site row's slot, which slots hold a
        token, and whether the order is the site's own (nothing to move).

        With `md.tokens_permuted` the video tokens arrive in tile order already (the graph runs
        in it): only the text moves, after the video and padded to whole tiles, if it must."""
        text = self._text_len(md, length)
        tile_index = _sparse_layout(md.tile_index)
        if getattr(md, "tokens_permuted", False):
            n = math.prod(md.grid)
            if md.token_gather is None or md.token_gather.shape[0] != n or tile_index.shape[0] != n:
                raise FvCompileError(
                    f"SLIDING_TILE_ATTN at {self.prefix or 'a site'} was handed tokens in tile order, but "
                    f"the tile {md.tile} does not divide the grid {md.grid}: tile order is no permutation"
                )
            return _cached(
                "order:permuted",
                tile_index,
                (text, self.text_first),
                lambda: self._build_placed_text(md, text),
            )
        order = _cached(
            "order", tile_index, (text, self.text_first), lambda: self._build_order(md, text)
        )
        return (*order, False)

    def _build_placed_text(self, md: SlidingTileMetadata, text: int):
        """`_token_order` for video tokens already in tile order: the video stays, the text goes
        after it, padded to whole tiles (an identity without text, or with whole tiles of it
        after the video)."""
        n = math.prod(md.grid)
        dev = _sparse_layout(md.tile_index).device
        pad = (-text) % math.prod(md.tile)
        if not self.text_first and pad == 0:
            ident = torch.arange(n + text, device=dev)
            return ident, ident, torch.ones(n + text, dtype=torch.bool, device=dev), True
        video_at, text_at = (text, 0) if self.text_first else (0, n)
        gather = torch.cat(
            [
                torch.arange(n, device=dev) + video_at,
                torch.arange(text, device=dev) + text_at,
                torch.full((pad,), video_at, dtype=torch.long, device=dev),
            ]
        )
        video, words = torch.arange(n, device=dev), torch.arange(n, n + text, device=dev)
        scatter = torch.cat([words, video] if self.text_first else [video, words])
        is_token = torch.cat(
            [
                torch.ones(n + text, dtype=torch.bool, device=dev),
                torch.zeros(pad, dtype=torch.bool, device=dev),
            ]
        )
        return gather, scatter, is_token, False

    def _build_order(self, md: SlidingTileMetadata, text: int):
        tile_index, untile_index = _sparse_layout(md.tile_index), _sparse_layout(md.untile_index)
        n, slots = math.prod(md.grid), tile_index.shape[0]
        video_at, text_at = (text, 0) if self.text_first else (0, n)
        dev = tile_index.device
        video = torch.where(tile_index < n, tile_index + video_at, video_at)
        pad = torch.full(((-text) % math.prod(md.tile),), video_at, dtype=torch.long, device=dev)
        gather = torch.cat([video, torch.arange(text, device=dev) + text_at, pad])
        words = torch.arange(slots, slots + text, device=dev)
        parts = [words, untile_index] if self.text_first else [untile_index, words]
        is_token = torch.cat(
            [
                tile_index < n,
                torch.ones(text, dtype=torch.bool, device=dev),
                torch.zeros(pad.shape[0], dtype=torch.bool, device=dev),
            ]
        )
        return gather, torch.cat(parts), is_token

    # -- attention ---------------------------------------------------------------------------

    def forward(self, query, key, value, attn_metadata):
        md = attn_metadata
        if md.dense:
            if self._dense is not None:
                return self._dense.forward(query, key, value, md)
            mask = getattr(md, "attn_mask", None)
            return sdpa_bshd(query, key, value, attn_mask=mask, scale=self.scale, causal=False)
        volume = math.prod(md.tile)
        use_fa4 = md.kernel != "triton" and fa4_supports(query, volume)
        if md.kernel == "flash_attn" and not use_fa4:
            raise FvCompileError(
                f"sta_kernel='flash_attn' cannot run this call (needs CUDA bf16/fp16, head dim 64 or "
                f"128 and tiles of a multiple of {PIECE} tokens; got {query.device.type} "
                f"{query.dtype}, head dim {query.shape[-1]}, tile {md.tile} = {volume} tokens): "
                "use sta_kernel='auto' to run the Triton kernel where FA4 cannot"
            )
        key_mask = self._key_mask(md)
        if key_mask is None and use_fa4:
            fa4_lists = self._block_lists(md, volume, True)
            return fa4_block_sparse_attention(query, key, value, fa4_lists, self.scale)
        # the step's tile lists; with a key mask, FA4's form of them depends on it: built per call
        index, counts, valid = self._block_lists(md, volume, False)
        if use_fa4:
            fa4_lists = fa4_block_lists(index, counts, valid, volume, True, key_mask)
            return fa4_block_sparse_attention(query, key, value, fa4_lists, self.scale)
        return block_sparse_attention(
            query, key, value, index, counts, valid, volume, self.scale, key_mask
        )

    def _key_mask(self, md: SlidingTileMetadata) -> torch.Tensor | None:
        """The site's key padding mask (`[B|1, 1, 1, S]`, True = attend) in tile-major slot order,
        `[B|1, L]`, False on padding slots; None without a mask."""
        mask = getattr(md, "attn_mask", None)
        if mask is None:
            return None
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            raise ValueError(
                f"SLIDING_TILE_ATTN takes a boolean key padding mask [B, 1, 1, S], got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        gather, _, is_token, identity = self._token_order(md)
        keys = mask[:, 0, 0]
        return (keys if identity else keys.index_select(1, gather)) & is_token

    def _block_lists(self, md: SlidingTileMetadata, volume: int, fa4: bool):
        """This layer's key-block lists with the text blocks added (as FA4 piece lists for the
        flash-attn-4 kernel), built once per step."""
        text = self._text_len(md)
        layer = self._layer(md)
        return _cached(
            f"lists:{layer}",
            _sparse_layout(md.kv_indices),
            (text, fa4, md.text_attends_all),
            lambda: self._build_lists(md, volume, text, fa4, layer),
        )

    def _layer(self, md: SlidingTileMetadata) -> int:
        """The layer whose windows this call uses: under regional compilation every block runs
        this one impl, and the running block says which it is."""
        running = current_layer()
        layers = _sparse_layout(md.kv_indices).shape[0]
        return min(self.layer if running is None else running, layers - 1)

    def reference(self, query, key, value, attn_metadata):
        """STA as defined, on the site's own token order: each video query attends the video
        keys of the tiles its window lists (plus the text keys, if `text_attends_all`), each
        text query every key (or the text only), under the site's key mask; float32, one query
        tile at a time. Tiles come from each token's grid coordinates, not from the tile-major
        layout the kernels use, so a reorder, list or kernel bug shows as a difference."""
        md = attn_metadata
        mask = getattr(md, "attn_mask", None)
        q, k, v = (x.float() for x in (query, key, value))
        if k.shape[2] != q.shape[2]:  # GQA: every query head sees its group's key head
            group = q.shape[2] // k.shape[2]
            k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        if md.dense:
            return sdpa_bshd(q, k, v, attn_mask=mask, scale=self.scale, causal=False)
        n, text = math.prod(md.grid), self._text_len(md, q.shape[1])
        dev = q.device
        video_at, text_at = (text, 0) if self.text_first else (0, n)
        raster = torch.arange(n, device=dev)
        if getattr(md, "tokens_permuted", False):  # position i holds raster token gather[i]
            raster = _sparse_layout(md.token_gather).to(dev)
        (_, gh, gw), (tt, th, tw) = md.grid, md.tile
        _, nh, nw = tiles_per_axis(md.grid, md.tile)
        t, h, w = raster // (gh * gw), raster // gw % gh, raster % gw
        tile_of = (t // tt * nh + h // th) * nw + w // tw  # [n]: the tile of each video position
        layer = self._layer(md)
        kv = _sparse_layout(md.kv_indices)[layer].to(dev).long()
        counts = _sparse_layout(md.kv_counts)[layer].to(dev)
        n_tiles = kv.shape[1]
        listed = torch.zeros(*kv.shape[:2], n_tiles + 1, dtype=torch.bool, device=dev)
        live = torch.arange(kv.shape[-1], device=dev) < counts[..., None]
        # entries past a row's count land on a spare column, dropped after
        listed.scatter_(-1, torch.where(live, kv, n_tiles), True)
        listed = listed[..., :n_tiles]  # [Hm, Q, Q]: whether query tile q lists key tile k
        words = torch.arange(text, device=dev) + text_at
        keys_ok = None if mask is None else mask[:, 0, 0].to(dev)  # [B|1, S], True = attend
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=dev)

        def attend(rows: torch.Tensor, cols: torch.Tensor, heads: slice) -> None:
            s = torch.einsum("bqhd,bkhd->bhqk", q[:, rows, heads], k[:, cols, heads]) * self.scale
            if keys_ok is not None:
                s = s.masked_fill(~keys_ok[:, None, None, cols], float("-inf"))
            p = torch.nan_to_num(s.softmax(-1))  # a row with no key gives 0
            out[:, rows, heads] = torch.einsum("bhqk,bkhd->bqhd", p, v[:, cols, heads])

        head_groups = listed.shape[0]
        if q.shape[2] % head_groups:
            raise FvCompileError(
                f"SLIDING_TILE_ATTN at {self.prefix or 'a site'}: {q.shape[2]} query heads, but the "
                f"step's windows are per {head_groups} head groups"
            )
        per = q.shape[2] // head_groups
        # each tile's positions, found once (one host sync): the rows it holds, and the keys it
        # gives the query tiles that list it
        sizes = torch.bincount(tile_of, minlength=n_tiles).tolist()
        members = torch.argsort(tile_of, stable=True).split(sizes)
        listed_host = listed.cpu()
        text_keys = torch.arange(n + text, device=dev) if md.text_attends_all else words
        for g in range(head_groups):
            heads = slice(g * per, (g + 1) * per)
            for tile in range(n_tiles):
                if sizes[tile] == 0:
                    continue
                seen = listed_host[g, tile].nonzero().flatten().tolist()
                cols = torch.cat([members[j] for j in seen] or [tile_of[:0]]) + video_at
                if md.text_attends_all:
                    cols = torch.cat([cols, words])
                attend(members[tile] + video_at, cols, heads)
            if text:
                attend(words, text_keys, heads)
        return out

    def _build_lists(self, md: SlidingTileMetadata, volume: int, text: int, fa4: bool, layer: int):
        kv_indices, kv_counts = _sparse_layout(md.kv_indices), _sparse_layout(md.kv_counts)
        lists = (kv_indices[layer], kv_counts[layer], _sparse_layout(md.block_valid))
        if text:
            lists = with_text_blocks(*lists, text, volume, md.text_attends_all)
        index, counts, valid = (t.contiguous() for t in lists)
        if fa4:
            # which tiles end inside a 128-row piece is known on the host: no device sync
            ragged = has_ragged_tiles(tile_geometry(md.grid, md.tile)[2]) or text % PIECE != 0
            return fa4_block_lists(index, counts, valid, volume, ragged)
        return index, counts, valid


def _sparse_layout(tensor: torch.Tensor | None) -> torch.Tensor:
    """A tensor of a sparse step's tile layout (SlidingTileMetadata leaves them None only on
    dense steps, which never reach the tile code)."""
    assert tensor is not None, "a sparse step's metadata holds its tile layout"
    return tensor


def _cached(name: str, source: torch.Tensor, key: Any, build):
    """`build()`, reused for the rest of the step while this step's metadata tensor `source` is
    the same object and `key` is unchanged. The cache is the forward context's (every site and
    CFG pass of the step shares it; the next step starts afresh): the sites of one layer (or of
    every layer, with one window for all) build their lists once per step. A CUDA graph must
    record the building, so nothing is reused while one is captured; outside a forward context
    nothing is reused."""
    cache = step_cache()
    capturing = source.is_cuda and torch.cuda.is_current_stream_capturing()
    hit = None if cache is None else cache.get((_CACHE_KEY, name))
    if not capturing and hit is not None and hit[0] is source and hit[1] == key:
        return hit[2]
    value = build()
    if cache is not None:
        cache[(_CACHE_KEY, name)] = (source, key, value)
    return value


_CACHE_KEY = "SLIDING_TILE_ATTN"  # this backend's entries in the step cache


class SlidingTileAttentionBackend(AttentionBackend):
    label = "STA"
    token_permutation = ("token_gather", "token_scatter")
    roles = ("self", "joint")  # video self-attention, and the video part of joint attention
    mask_kinds = (MASK_KEY_PADDING,)  # HunyuanVideo's text padding
    causal = False
    value_head_dim_differs = True
    needs_head_groups = False

    @staticmethod
    def get_name() -> str:
        return "SLIDING_TILE_ATTN"

    @staticmethod
    def get_impl_cls() -> type[SlidingTileAttentionImpl]:
        return SlidingTileAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[SlidingTileMetadata]:
        return SlidingTileMetadata

    @staticmethod
    def get_builder_cls() -> type[SlidingTileMetadataBuilder]:
        return SlidingTileMetadataBuilder

    @staticmethod
    def supports(site: AttentionSite) -> str | None:
        # on the CPU a head dim the kernel does not compile for runs on the reference path
        if site.device.startswith("cuda") and site.head_dim not in TRITON_HEAD_DIMS:
            supported = " and ".join(map(str, TRITON_HEAD_DIMS))
            return f"head dim {site.head_dim} (the kernel supports {supported})"
        return None
