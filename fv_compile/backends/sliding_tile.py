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
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fv_compile.backends._checks import interpreting
from fv_compile.backends._dense import sdpa_bshd
from fv_compile.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from fv_compile.backends.kernels import TRITON_HEAD_DIMS
from fv_compile.backends.kernels.fa4_block_sparse import (
    PIECE,
    fa4_block_lists,
    fa4_block_sparse,
    fa4_block_sparse_attention,
    has_ragged_tiles,
)
from fv_compile.backends.kernels.fa4_block_sparse import supports as fa4_supports
from fv_compile.backends.tiles import Grid, tile_geometry, tiles_per_axis, window_lists
from fv_compile.context import current_block, patch_size_of
from fv_compile.errors import FvCompileError
from fv_compile.site import MASK_KEY_PADDING, AttentionSite

@dataclass
class SlidingTileMetadata(AttentionMetadata):
    grid: Grid = (0, 0, 0)  # token grid (T, H, W)
    tile: Grid = (6, 8, 8)
    dense: bool = False  # this step runs full attention
    text_attends_all: bool = True
    kernel: str = "auto"  # "auto" (flash-attn-4 when it can run, else Triton), "triton", "flash_attn"
    tile_index: torch.Tensor | None = None  # long [n_tiles * volume]
    untile_index: torch.Tensor | None = None  # long [T*H*W]
    block_valid: torch.Tensor | None = None  # int32 [n_tiles]
    kv_indices: torch.Tensor | None = None  # int32 [L, Hm, n_tiles, K]
    kv_counts: torch.Tensor | None = None  # int32 [L, Hm, n_tiles]


def token_grid(raw_latent_shape: Any, patch: Grid) -> Grid:
    """Token grid from the latent `(B, C, T, H, W)` and the DiT patch size."""
    if raw_latent_shape is None or len(raw_latent_shape) != 5:
        raise FvCompileError(
            "SLIDING_TILE_ATTN needs the latent shape: pass "
            "forward_batch=ForwardBatch(raw_latent_shape=latent.shape) ([B, C, T, H, W])"
        )
    t, h, w = (int(s) for s in raw_latent_shape[2:])
    if t % patch[0] or h % patch[1] or w % patch[2]:
        raise FvCompileError(
            f"latent grid {(t, h, w)} is not divisible by patch size {patch}: pass the latent as the "
            "model receives it, before patchify (ForwardBatch(raw_latent_shape=latent.shape)), and "
            "the DiT's patch size (FastVideoArgs(patch_size=...))"
        )
    return (t // patch[0], h // patch[1], w // patch[2])


def _load_strategy(path: str) -> dict[tuple[int, int, int], Grid]:
    """FastVideo's mask-strategy JSON: `{"<step>_<layer>_<head>": [wt, wh, ww], ...}`."""
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for key, window in raw.items():
        step, layer, head = (int(x) for x in key.split("_"))
        out[(step, layer, head)] = tuple(int(x) for x in window)
    return out


_STRATEGIES: dict[str, dict[tuple[int, int, int], Grid]] = {}


def step_windows(step: int, forward_batch: Any, args: Any, n_tiles: Grid) -> list[list[Grid]] | None:
    """Windows `[layer][head]` (in tiles) for this step, or None for a full-attention step."""
    if step < int(getattr(args, "sta_dense_steps", 0) or 0):
        return None
    windows: list[list[Grid]] | None = None
    param = getattr(forward_batch, "STA_param", None)
    path = getattr(args, "mask_strategy_file_path", None)
    if param is not None:
        per_step = param[min(step, len(param) - 1)]
        windows = [[tuple(int(x) for x in w) for w in layer] for layer in per_step]
    elif path:
        if path not in _STRATEGIES:
            _STRATEGIES[path] = _load_strategy(path)
        table = _STRATEGIES[path]
        layers = 1 + max(k[1] for k in table)
        heads = 1 + max(k[2] for k in table)
        steps = sorted({k[0] for k in table})
        use = max((s for s in steps if s <= step), default=steps[0])
        windows = [
            [table.get((use, li, hi), n_tiles) for hi in range(heads)] for li in range(layers)
        ]
    elif getattr(args, "sta_window", None) is not None:
        windows = [[tuple(int(x) for x in args.sta_window)]]
    else:
        raise FvCompileError(
            "SLIDING_TILE_ATTN needs windows: set FastVideoArgs(sta_window=(wt, wh, ww)) (in tiles), "
            "FastVideoArgs(mask_strategy_file_path=...), or ForwardBatch(STA_param=...); the "
            "FastVideoArgs go to fv_compile.compile(..., fastvideo_args=...) or to forward_context"
        )
    if all(all(w[i] >= n_tiles[i] for i in range(3)) for layer in windows for w in layer):
        return None
    return windows


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
        grid = token_grid(getattr(forward_batch, "raw_latent_shape", None), patch_size_of(fastvideo_args))
        tile = tuple(int(x) for x in getattr(fastvideo_args, "sta_tile_size", (6, 8, 8)))
        n_tiles = tiles_per_axis(grid, tile)
        text_all = bool(getattr(fastvideo_args, "sta_text_attends_all", True))
        kernel = sparse_kernel_choice(fastvideo_args)
        windows = step_windows(int(current_timestep), forward_batch, fastvideo_args, n_tiles)
        if windows is None:
            return SlidingTileMetadata(current_timestep, grid, tile, True, text_all, kernel)
        tile_index, untile_index, block_valid = tile_geometry(grid, tile)
        kv_indices, kv_counts = window_lists(n_tiles, windows)
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
        )


def layer_index(prefix: str) -> int:
    """The block number in a module path (`blocks.7.attn1.impl` -> 7); 0 when there is none."""
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
        **extra_impl_args: Any,
    ) -> None:
        if causal:
            raise FvCompileError("SLIDING_TILE_ATTN is non-causal: run causal attention on a dense backend")
        self.scale = softmax_scale
        self.prefix = prefix
        self.layer = layer_index(prefix)
        if site is not None:
            joint = site.role == "joint"
            self.q_len: int | None = site.q_len
            self.text_len = int(site.joint_text_len or 0) if joint else 0
            self.text_first = bool(joint and site.joint_text_first)
            self.role = site.role
        else:
            if joint_text_len is not None and (isinstance(joint_text_len, bool) or int(joint_text_len) < 0):
                raise FvCompileError(f"joint_text_len must be a token count >= 0, got {joint_text_len!r}")
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
        total = self.q_len if self.q_len is not None else length if length is not None else self._seen_len
        if total is not None and total != n + self.text_len:
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
        return qkv.index_select(1, self._token_order(md, qkv.shape[1])[0])

    def postprocess_output(self, output: torch.Tensor, attn_metadata: SlidingTileMetadata) -> torch.Tensor:
        md = attn_metadata
        if md.dense:
            return output
        return output.index_select(1, self._token_order(md)[1])

    def _token_order(self, md: SlidingTileMetadata, length: int | None = None):
        """`(gather, scatter, is_token)`: the site's row for every tile-major slot (video tiles,
        then text padded to whole tiles), every site row's slot, and which slots hold a token."""
        text = self._text_len(md, length)
        return _cached("order", md.tile_index, (text, self.text_first), lambda: self._build_order(md, text))

    def _build_order(self, md: SlidingTileMetadata, text: int):
        n, slots = math.prod(md.grid), md.tile_index.shape[0]
        video_at, text_at = (text, 0) if self.text_first else (0, n)
        dev = md.tile_index.device
        video = torch.where(md.tile_index < n, md.tile_index + video_at, video_at)
        pad = torch.full(((-text) % math.prod(md.tile),), video_at, dtype=torch.long, device=dev)
        gather = torch.cat([video, torch.arange(text, device=dev) + text_at, pad])
        words = torch.arange(slots, slots + text, device=dev)
        parts = [words, md.untile_index] if self.text_first else [md.untile_index, words]
        is_token = torch.cat([
            md.tile_index < n,
            torch.ones(text, dtype=torch.bool, device=dev),
            torch.zeros(pad.shape[0], dtype=torch.bool, device=dev),
        ])
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
        if key_mask is None:
            lists = self._block_lists(md, volume, use_fa4)
        else:  # the lists' FA4 form depends on the mask: built per call from the step's tile lists
            lists = self._block_lists(md, volume, False)
            if use_fa4:
                lists = fa4_block_lists(*lists, volume, True, key_mask)
        if use_fa4:
            return fa4_block_sparse_attention(query, key, value, lists, self.scale)
        return block_sparse_attention(query, key, value, *lists, volume, self.scale, key_mask)

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
        gather, _, is_token = self._token_order(md)
        return mask[:, 0, 0].index_select(1, gather) & is_token

    def _block_lists(self, md: SlidingTileMetadata, volume: int, fa4: bool):
        """This layer's key-block lists with the text blocks added (as FA4 piece lists for the
        flash-attn-4 kernel), built once per step."""
        text = self._text_len(md)
        running = current_block()  # under regional compilation every block runs this one impl
        layer = min(self.layer if running is None else running, md.kv_indices.shape[0] - 1)
        return _cached(
            f"lists:{layer}", md.kv_indices, (text, fa4, md.text_attends_all), lambda: self._build_lists(md, volume, text, fa4, layer)
        )

    def _build_lists(self, md: SlidingTileMetadata, volume: int, text: int, fa4: bool, layer: int):
        lists = (md.kv_indices[layer], md.kv_counts[layer], md.block_valid)
        if text:
            lists = with_text_blocks(*lists, text, volume, md.text_attends_all)
        lists = tuple(t.contiguous() for t in lists)
        if fa4:
            # which tiles end inside a 128-row piece is known on the host: no device sync
            ragged = has_ragged_tiles(tile_geometry(md.grid, md.tile)[2]) or text % PIECE != 0
            lists = fa4_block_lists(*lists, volume, ragged)
        return lists


_STEP_CACHE: dict[str, tuple[torch.Tensor, Any, Any]] = {}


def _cached(name: str, source: torch.Tensor, key: Any, build):
    """`build()`, reused while this step's metadata tensor `source` is the same object and `key`
    is unchanged. Shared by every site: all of them receive the step's metadata tensors, so the
    sites of one layer (or of every layer, with one window for all) build their lists once per
    step. A CUDA graph must record the building, so nothing is reused while one is captured."""
    capturing = source.is_cuda and torch.cuda.is_current_stream_capturing()
    hit = _STEP_CACHE.get(name)
    if not capturing and hit is not None and hit[0] is source and hit[1] == key:
        return hit[2]
    value = build()
    _STEP_CACHE[name] = (source, key, value)
    return value


def with_text_blocks(idx, cnt, valid, text: int, volume: int, text_attends_all: bool):
    """Add `ceil(text / volume)` text blocks after the video tiles to block lists `[Hm, Q, K]`."""
    hm, n_video, k = idx.shape
    n_text = -(-text // volume)
    total = n_video + n_text
    dev = idx.device
    text_ids = torch.arange(n_video, total, dtype=torch.int32, device=dev)
    text_valid = (text - torch.arange(n_text, device=dev) * volume).clamp(0, volume).to(torch.int32)
    width = total if text_attends_all else max(k, n_text)
    video_rows = F.pad(idx, (0, width - k))
    if text_attends_all:
        at = cnt[..., None].long() + torch.arange(n_text, device=dev)
        video_rows = video_rows.scatter(-1, at, text_ids.expand(hm, n_video, n_text))
        text_rows = torch.arange(total, dtype=torch.int32, device=dev).expand(hm, n_text, width)
        counts = torch.cat([cnt + n_text, cnt.new_full((hm, n_text), total)], 1)
    else:
        text_rows = F.pad(text_ids.expand(hm, n_text, n_text), (0, width - n_text))
        counts = torch.cat([cnt, cnt.new_full((hm, n_text), n_text)], 1)
    return torch.cat([video_rows, text_rows], 1), counts, torch.cat([valid, text_valid])


def block_sparse_attention(q, k, v, kv_indices, kv_counts, block_valid, block_size, scale, key_mask=None):
    """Attention over tile-major tensors visiting only the listed key blocks (and, with
    `key_mask` `[B|1, L]`, only the keys it keeps)."""
    kernel_ok = (
        (q.is_cuda or interpreting())
        and q.shape[-1] in TRITON_HEAD_DIMS
        and block_size % 16 == 0
    )
    if kernel_ok:
        from fv_compile.backends.kernels.block_sparse_fwd import block_sparse_attention_fwd

        return block_sparse_attention_fwd(
            q, k, v, kv_indices, kv_counts, block_valid, block_size=block_size, softmax_scale=scale,
            key_mask=key_mask,
        )
    return block_sparse_reference(q, k, v, kv_indices, kv_counts, block_valid, block_size, scale, key_mask)


def block_mask(kv_indices, kv_counts, block_valid, block_size: int) -> torch.Tensor:
    """The boolean `[Hm, L, L]` token mask that block lists describe (True = attend)."""
    hm, nq, _ = kv_indices.shape
    nb = block_valid.shape[0]
    listed = torch.zeros(hm, nq, nb + 1, dtype=torch.bool, device=kv_indices.device)
    k_pos = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    live = k_pos < kv_counts[..., None]
    # entries past a row's count point at a spare column, so they can never clear a listed block
    listed.scatter_(-1, torch.where(live, kv_indices.long(), nb), True)
    listed = listed[..., :nb]
    local = torch.arange(block_size, device=kv_indices.device)
    key_ok = (local[None, :] < block_valid[:, None].to(local.device)).reshape(-1)
    mask = listed.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return mask & key_ok


def block_sparse_reference(q, k, v, kv_indices, kv_counts, block_valid, block_size, scale, key_mask=None):
    """Dense SDPA with the block lists' mask; rows without a key (padding) give 0."""
    mask = block_mask(kv_indices, kv_counts, block_valid, block_size)[None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    h, hk = q.shape[2], k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if hk != h:
        kt, vt = kt.repeat_interleave(h // hk, 1), vt.repeat_interleave(h // hk, 1)
    scores = (qt.float() @ kt.float().transpose(-2, -1)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1))
    return (probs @ vt.float()).to(q.dtype).transpose(1, 2)


class SlidingTileAttentionBackend(AttentionBackend):
    label = "STA"
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
            return f"head dim {site.head_dim} (the kernel supports {' and '.join(map(str, TRITON_HEAD_DIMS))})"
        return None
